# Print an optspec for argparse to handle cmd's options that are independent of any subcommand.
function __fish_vcfed_global_optspecs
    string join \n log-format= c/config= h/help V/version
end

function __fish_vcfed_needs_command
    # Figure out if the current invocation already has a command.
    set -l cmd (commandline -opc)
    set -e cmd[1]
    argparse -s (__fish_vcfed_global_optspecs) -- $cmd 2>/dev/null
    or return
    if set -q argv[1]
        # Also print the command, so this can be used to figure out what it is.
        echo $argv[1]
        return 1
    end
    return 0
end

function __fish_vcfed_using_subcommand
    set -l cmd (__fish_vcfed_needs_command)
    test -z "$cmd"
    and return 1
    contains -- $cmd[1] $argv
end

complete -c vcfed -n "__fish_vcfed_needs_command" -l log-format -d 'Log format on stderr. RUST_LOG sets the level (default: info for `run`, warn otherwise)' -r -f -a "text\t'Human-readable lines'
json\t'One JSON object per line'"
complete -c vcfed -n "__fish_vcfed_needs_command" -s c -l config -d 'The site\'s config file (written by `vcfed init`), before or after the subcommand; for `vcfed init`, where to write it [default: DATA_DIR/vcfed.toml]; for `vcfed gateway`, the gateway\'s config (or VCFED_GATEWAY_CONFIG)' -r -F
complete -c vcfed -n "__fish_vcfed_needs_command" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c vcfed -n "__fish_vcfed_needs_command" -s V -l version -d 'Print version'
complete -c vcfed -n "__fish_vcfed_needs_command" -f -a "init" -d 'Create a site: write a commented config and generate the site\'s keys and API token'
complete -c vcfed -n "__fish_vcfed_needs_command" -f -a "run" -d 'Run the site agent until SIGTERM or Ctrl-C'
complete -c vcfed -n "__fish_vcfed_needs_command" -f -a "status" -d 'Show the site: name, peer id, capacity'
complete -c vcfed -n "__fish_vcfed_needs_command" -f -a "capacity" -d 'Show free nodes over a time window, as steps'
complete -c vcfed -n "__fish_vcfed_needs_command" -f -a "reservation" -d 'Hold, commit, release and list local reservations'
complete -c vcfed -n "__fish_vcfed_needs_command" -f -a "cluster" -d 'Create, list, show and delete virtual clusters'
complete -c vcfed -n "__fish_vcfed_needs_command" -f -a "sites" -d 'List the federation\'s sites as this site sees them'
complete -c vcfed -n "__fish_vcfed_needs_command" -f -a "events" -d 'Show the site\'s event log (all of it, or one cluster\'s), and with --follow as it grows'
complete -c vcfed -n "__fish_vcfed_needs_command" -f -a "join" -d 'Connect the running agent to a federation member'
complete -c vcfed -n "__fish_vcfed_needs_command" -f -a "psk" -d 'Federation pre-shared keys (private federations)'
complete -c vcfed -n "__fish_vcfed_needs_command" -f -a "demo" -d 'Run a demo on this machine: as root, a federation of three sites in network namespaces builds one cluster from all their nodes; without root (or with --local), a tour of one site'
complete -c vcfed -n "__fish_vcfed_needs_command" -f -a "gateway" -d 'Run the overlay data plane alone (`--config FILE`), for debugging and benchmarks; `genkey` and `pubkey` make its WireGuard keys'
complete -c vcfed -n "__fish_vcfed_needs_command" -f -a "simnet" -d 'Simulate a whole federation on a virtual clock under faults and check its invariants (deterministic: a seed replays a run)'
complete -c vcfed -n "__fish_vcfed_needs_command" -f -a "completions" -d 'Print a shell completion script: `vcfed completions bash > /etc/bash_completion.d/vcfed` (or zsh, fish, elvish, powershell)'
complete -c vcfed -n "__fish_vcfed_needs_command" -f -a "man" -d 'Print the manual page (roff): `vcfed man > /usr/share/man/man1/vcfed.1`'
complete -c vcfed -n "__fish_vcfed_needs_command" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c vcfed -n "__fish_vcfed_using_subcommand init" -l site -d 'Site name: lowercase letters, digits and \'-\', at most 63' -r
complete -c vcfed -n "__fish_vcfed_using_subcommand init" -l data-dir -d 'Directory for the site\'s keys and ledger (created, mode 0700)' -r -F
complete -c vcfed -n "__fish_vcfed_using_subcommand init" -l api-listen -d 'Address of the local HTTP API' -r
complete -c vcfed -n "__fish_vcfed_using_subcommand init" -l listen -d 'Federation listen address (repeatable)' -r
complete -c vcfed -n "__fish_vcfed_using_subcommand init" -l gateway-listen -d 'UDP address of the gateway\'s data plane' -r
complete -c vcfed -n "__fish_vcfed_using_subcommand init" -l bootstrap -d 'Federation member to join through, ending in /p2p/<peer id> (repeatable)' -r
complete -c vcfed -n "__fish_vcfed_using_subcommand init" -l nodes -d 'Node slots of the site (the `nodes = N` shorthand of the inventory)' -r
complete -c vcfed -n "__fish_vcfed_using_subcommand init" -l node-cores -d 'Cores of one node slot' -r
complete -c vcfed -n "__fish_vcfed_using_subcommand init" -l node-memory-mib -d 'Memory of one node slot, MiB' -r
complete -c vcfed -n "__fish_vcfed_using_subcommand init" -l node-disk-gib -d 'Disk of one node slot, GiB' -r
complete -c vcfed -n "__fish_vcfed_using_subcommand init" -l vlans -d 'VLAN ids this site may give to clusters' -r
complete -c vcfed -n "__fish_vcfed_using_subcommand init" -l log-format -d 'Log format on stderr. RUST_LOG sets the level (default: info for `run`, warn otherwise)' -r -f -a "text\t'Human-readable lines'
json\t'One JSON object per line'"
complete -c vcfed -n "__fish_vcfed_using_subcommand init" -s c -l config -d 'The site\'s config file (written by `vcfed init`), before or after the subcommand; for `vcfed init`, where to write it [default: DATA_DIR/vcfed.toml]; for `vcfed gateway`, the gateway\'s config (or VCFED_GATEWAY_CONFIG)' -r -F
complete -c vcfed -n "__fish_vcfed_using_subcommand init" -l force -d 'Replace an existing config and keys (the site gets a new identity)'
complete -c vcfed -n "__fish_vcfed_using_subcommand init" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c vcfed -n "__fish_vcfed_using_subcommand init" -s V -l version -d 'Print version'
complete -c vcfed -n "__fish_vcfed_using_subcommand run" -l log-format -d 'Log format on stderr. RUST_LOG sets the level (default: info for `run`, warn otherwise)' -r -f -a "text\t'Human-readable lines'
json\t'One JSON object per line'"
complete -c vcfed -n "__fish_vcfed_using_subcommand run" -s c -l config -d 'The site\'s config file (written by `vcfed init`), before or after the subcommand; for `vcfed init`, where to write it [default: DATA_DIR/vcfed.toml]; for `vcfed gateway`, the gateway\'s config (or VCFED_GATEWAY_CONFIG)' -r -F
complete -c vcfed -n "__fish_vcfed_using_subcommand run" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c vcfed -n "__fish_vcfed_using_subcommand run" -s V -l version -d 'Print version'
complete -c vcfed -n "__fish_vcfed_using_subcommand status" -l log-format -d 'Log format on stderr. RUST_LOG sets the level (default: info for `run`, warn otherwise)' -r -f -a "text\t'Human-readable lines'
json\t'One JSON object per line'"
complete -c vcfed -n "__fish_vcfed_using_subcommand status" -s c -l config -d 'The site\'s config file (written by `vcfed init`), before or after the subcommand; for `vcfed init`, where to write it [default: DATA_DIR/vcfed.toml]; for `vcfed gateway`, the gateway\'s config (or VCFED_GATEWAY_CONFIG)' -r -F
complete -c vcfed -n "__fish_vcfed_using_subcommand status" -l json -d 'Print JSON instead of text'
complete -c vcfed -n "__fish_vcfed_using_subcommand status" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c vcfed -n "__fish_vcfed_using_subcommand status" -s V -l version -d 'Print version'
complete -c vcfed -n "__fish_vcfed_using_subcommand capacity" -l from -d 'Window start: `now`, `+2h`, RFC 3339 or unix ms' -r
complete -c vcfed -n "__fish_vcfed_using_subcommand capacity" -l to -d 'Window end [default: 7 days after --from]' -r
complete -c vcfed -n "__fish_vcfed_using_subcommand capacity" -l log-format -d 'Log format on stderr. RUST_LOG sets the level (default: info for `run`, warn otherwise)' -r -f -a "text\t'Human-readable lines'
json\t'One JSON object per line'"
complete -c vcfed -n "__fish_vcfed_using_subcommand capacity" -s c -l config -d 'The site\'s config file (written by `vcfed init`), before or after the subcommand; for `vcfed init`, where to write it [default: DATA_DIR/vcfed.toml]; for `vcfed gateway`, the gateway\'s config (or VCFED_GATEWAY_CONFIG)' -r -F
complete -c vcfed -n "__fish_vcfed_using_subcommand capacity" -l json -d 'Print JSON instead of text'
complete -c vcfed -n "__fish_vcfed_using_subcommand capacity" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c vcfed -n "__fish_vcfed_using_subcommand capacity" -s V -l version -d 'Print version'
complete -c vcfed -n "__fish_vcfed_using_subcommand reservation; and not __fish_seen_subcommand_from hold commit release list help" -l log-format -d 'Log format on stderr. RUST_LOG sets the level (default: info for `run`, warn otherwise)' -r -f -a "text\t'Human-readable lines'
json\t'One JSON object per line'"
complete -c vcfed -n "__fish_vcfed_using_subcommand reservation; and not __fish_seen_subcommand_from hold commit release list help" -s c -l config -d 'The site\'s config file (written by `vcfed init`), before or after the subcommand; for `vcfed init`, where to write it [default: DATA_DIR/vcfed.toml]; for `vcfed gateway`, the gateway\'s config (or VCFED_GATEWAY_CONFIG)' -r -F
complete -c vcfed -n "__fish_vcfed_using_subcommand reservation; and not __fish_seen_subcommand_from hold commit release list help" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c vcfed -n "__fish_vcfed_using_subcommand reservation; and not __fish_seen_subcommand_from hold commit release list help" -s V -l version -d 'Print version'
complete -c vcfed -n "__fish_vcfed_using_subcommand reservation; and not __fish_seen_subcommand_from hold commit release list help" -f -a "hold" -d 'Hold nodes for a window; the hold expires after its lease unless committed'
complete -c vcfed -n "__fish_vcfed_using_subcommand reservation; and not __fish_seen_subcommand_from hold commit release list help" -f -a "commit" -d 'Commit a hold'
complete -c vcfed -n "__fish_vcfed_using_subcommand reservation; and not __fish_seen_subcommand_from hold commit release list help" -f -a "release" -d 'Release a hold or a commitment'
complete -c vcfed -n "__fish_vcfed_using_subcommand reservation; and not __fish_seen_subcommand_from hold commit release list help" -f -a "list" -d 'List reservations that take capacity (or all with --all)'
complete -c vcfed -n "__fish_vcfed_using_subcommand reservation; and not __fish_seen_subcommand_from hold commit release list help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c vcfed -n "__fish_vcfed_using_subcommand reservation; and __fish_seen_subcommand_from hold" -l nodes -d 'Number of nodes' -r
complete -c vcfed -n "__fish_vcfed_using_subcommand reservation; and __fish_seen_subcommand_from hold" -l start -d 'Window start: `now`, `+2h`, RFC 3339 or unix ms' -r
complete -c vcfed -n "__fish_vcfed_using_subcommand reservation; and __fish_seen_subcommand_from hold" -l duration -d 'Window length, e.g. 2h' -r
complete -c vcfed -n "__fish_vcfed_using_subcommand reservation; and __fish_seen_subcommand_from hold" -l lease -d 'Lease of the hold before it must be committed, e.g. 60s' -r
complete -c vcfed -n "__fish_vcfed_using_subcommand reservation; and __fish_seen_subcommand_from hold" -l key -d 'Idempotency key [default: a fresh one]' -r
complete -c vcfed -n "__fish_vcfed_using_subcommand reservation; and __fish_seen_subcommand_from hold" -l cluster -d 'Cluster the nodes are for [default: "local"]' -r
complete -c vcfed -n "__fish_vcfed_using_subcommand reservation; and __fish_seen_subcommand_from hold" -l log-format -d 'Log format on stderr. RUST_LOG sets the level (default: info for `run`, warn otherwise)' -r -f -a "text\t'Human-readable lines'
json\t'One JSON object per line'"
complete -c vcfed -n "__fish_vcfed_using_subcommand reservation; and __fish_seen_subcommand_from hold" -s c -l config -d 'The site\'s config file (written by `vcfed init`), before or after the subcommand; for `vcfed init`, where to write it [default: DATA_DIR/vcfed.toml]; for `vcfed gateway`, the gateway\'s config (or VCFED_GATEWAY_CONFIG)' -r -F
complete -c vcfed -n "__fish_vcfed_using_subcommand reservation; and __fish_seen_subcommand_from hold" -l commit -d 'Commit at once'
complete -c vcfed -n "__fish_vcfed_using_subcommand reservation; and __fish_seen_subcommand_from hold" -l json -d 'Print JSON instead of text'
complete -c vcfed -n "__fish_vcfed_using_subcommand reservation; and __fish_seen_subcommand_from hold" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c vcfed -n "__fish_vcfed_using_subcommand reservation; and __fish_seen_subcommand_from hold" -s V -l version -d 'Print version'
complete -c vcfed -n "__fish_vcfed_using_subcommand reservation; and __fish_seen_subcommand_from commit" -l log-format -d 'Log format on stderr. RUST_LOG sets the level (default: info for `run`, warn otherwise)' -r -f -a "text\t'Human-readable lines'
json\t'One JSON object per line'"
complete -c vcfed -n "__fish_vcfed_using_subcommand reservation; and __fish_seen_subcommand_from commit" -s c -l config -d 'The site\'s config file (written by `vcfed init`), before or after the subcommand; for `vcfed init`, where to write it [default: DATA_DIR/vcfed.toml]; for `vcfed gateway`, the gateway\'s config (or VCFED_GATEWAY_CONFIG)' -r -F
complete -c vcfed -n "__fish_vcfed_using_subcommand reservation; and __fish_seen_subcommand_from commit" -l json -d 'Print JSON instead of text'
complete -c vcfed -n "__fish_vcfed_using_subcommand reservation; and __fish_seen_subcommand_from commit" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c vcfed -n "__fish_vcfed_using_subcommand reservation; and __fish_seen_subcommand_from commit" -s V -l version -d 'Print version'
complete -c vcfed -n "__fish_vcfed_using_subcommand reservation; and __fish_seen_subcommand_from release" -l log-format -d 'Log format on stderr. RUST_LOG sets the level (default: info for `run`, warn otherwise)' -r -f -a "text\t'Human-readable lines'
json\t'One JSON object per line'"
complete -c vcfed -n "__fish_vcfed_using_subcommand reservation; and __fish_seen_subcommand_from release" -s c -l config -d 'The site\'s config file (written by `vcfed init`), before or after the subcommand; for `vcfed init`, where to write it [default: DATA_DIR/vcfed.toml]; for `vcfed gateway`, the gateway\'s config (or VCFED_GATEWAY_CONFIG)' -r -F
complete -c vcfed -n "__fish_vcfed_using_subcommand reservation; and __fish_seen_subcommand_from release" -l json -d 'Print JSON instead of text'
complete -c vcfed -n "__fish_vcfed_using_subcommand reservation; and __fish_seen_subcommand_from release" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c vcfed -n "__fish_vcfed_using_subcommand reservation; and __fish_seen_subcommand_from release" -s V -l version -d 'Print version'
complete -c vcfed -n "__fish_vcfed_using_subcommand reservation; and __fish_seen_subcommand_from list" -l log-format -d 'Log format on stderr. RUST_LOG sets the level (default: info for `run`, warn otherwise)' -r -f -a "text\t'Human-readable lines'
json\t'One JSON object per line'"
complete -c vcfed -n "__fish_vcfed_using_subcommand reservation; and __fish_seen_subcommand_from list" -s c -l config -d 'The site\'s config file (written by `vcfed init`), before or after the subcommand; for `vcfed init`, where to write it [default: DATA_DIR/vcfed.toml]; for `vcfed gateway`, the gateway\'s config (or VCFED_GATEWAY_CONFIG)' -r -F
complete -c vcfed -n "__fish_vcfed_using_subcommand reservation; and __fish_seen_subcommand_from list" -l all -d 'Include released and expired reservations'
complete -c vcfed -n "__fish_vcfed_using_subcommand reservation; and __fish_seen_subcommand_from list" -l json -d 'Print JSON instead of text'
complete -c vcfed -n "__fish_vcfed_using_subcommand reservation; and __fish_seen_subcommand_from list" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c vcfed -n "__fish_vcfed_using_subcommand reservation; and __fish_seen_subcommand_from list" -s V -l version -d 'Print version'
complete -c vcfed -n "__fish_vcfed_using_subcommand reservation; and __fish_seen_subcommand_from help" -f -a "hold" -d 'Hold nodes for a window; the hold expires after its lease unless committed'
complete -c vcfed -n "__fish_vcfed_using_subcommand reservation; and __fish_seen_subcommand_from help" -f -a "commit" -d 'Commit a hold'
complete -c vcfed -n "__fish_vcfed_using_subcommand reservation; and __fish_seen_subcommand_from help" -f -a "release" -d 'Release a hold or a commitment'
complete -c vcfed -n "__fish_vcfed_using_subcommand reservation; and __fish_seen_subcommand_from help" -f -a "list" -d 'List reservations that take capacity (or all with --all)'
complete -c vcfed -n "__fish_vcfed_using_subcommand reservation; and __fish_seen_subcommand_from help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c vcfed -n "__fish_vcfed_using_subcommand cluster; and not __fish_seen_subcommand_from create list show delete help" -l log-format -d 'Log format on stderr. RUST_LOG sets the level (default: info for `run`, warn otherwise)' -r -f -a "text\t'Human-readable lines'
json\t'One JSON object per line'"
complete -c vcfed -n "__fish_vcfed_using_subcommand cluster; and not __fish_seen_subcommand_from create list show delete help" -s c -l config -d 'The site\'s config file (written by `vcfed init`), before or after the subcommand; for `vcfed init`, where to write it [default: DATA_DIR/vcfed.toml]; for `vcfed gateway`, the gateway\'s config (or VCFED_GATEWAY_CONFIG)' -r -F
complete -c vcfed -n "__fish_vcfed_using_subcommand cluster; and not __fish_seen_subcommand_from create list show delete help" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c vcfed -n "__fish_vcfed_using_subcommand cluster; and not __fish_seen_subcommand_from create list show delete help" -s V -l version -d 'Print version'
complete -c vcfed -n "__fish_vcfed_using_subcommand cluster; and not __fish_seen_subcommand_from create list show delete help" -f -a "create" -d 'Ask this site for a cluster; it becomes the master and borrows nodes from other sites if it has too few'
complete -c vcfed -n "__fish_vcfed_using_subcommand cluster; and not __fish_seen_subcommand_from create list show delete help" -f -a "list" -d 'List the clusters this site masters or serves'
complete -c vcfed -n "__fish_vcfed_using_subcommand cluster; and not __fish_seen_subcommand_from create list show delete help" -f -a "show" -d 'Show one cluster with its per-site parts'
complete -c vcfed -n "__fish_vcfed_using_subcommand cluster; and not __fish_seen_subcommand_from create list show delete help" -f -a "delete" -d 'Delete a cluster (at its master): releases its nodes at every site'
complete -c vcfed -n "__fish_vcfed_using_subcommand cluster; and not __fish_seen_subcommand_from create list show delete help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c vcfed -n "__fish_vcfed_using_subcommand cluster; and __fish_seen_subcommand_from create" -l name -d 'Cluster name' -r
complete -c vcfed -n "__fish_vcfed_using_subcommand cluster; and __fish_seen_subcommand_from create" -l nodes -d 'Compute nodes (the frontend comes on top, at this site)' -r
complete -c vcfed -n "__fish_vcfed_using_subcommand cluster; and __fish_seen_subcommand_from create" -l cores -d 'Cores per node [default: this site\'s node slot]' -r
complete -c vcfed -n "__fish_vcfed_using_subcommand cluster; and __fish_seen_subcommand_from create" -l memory-mib -d 'Memory per node, MiB [default: this site\'s node slot]' -r
complete -c vcfed -n "__fish_vcfed_using_subcommand cluster; and __fish_seen_subcommand_from create" -l disk-gib -d 'Disk per node, GiB [default: this site\'s node slot]' -r
complete -c vcfed -n "__fish_vcfed_using_subcommand cluster; and __fish_seen_subcommand_from create" -l start -d 'Start: `now`, `+2h`, RFC 3339 or unix ms' -r
complete -c vcfed -n "__fish_vcfed_using_subcommand cluster; and __fish_seen_subcommand_from create" -l duration -d 'How long the cluster runs, e.g. 2h' -r
complete -c vcfed -n "__fish_vcfed_using_subcommand cluster; and __fish_seen_subcommand_from create" -l image -d 'Image the nodes install' -r
complete -c vcfed -n "__fish_vcfed_using_subcommand cluster; and __fish_seen_subcommand_from create" -l heal -d 'When a worker site holding some of the nodes is lost (gone from the federation and silent for `clusters.heal_grace`): `replace` its nodes at other sites, `shrink` the cluster, or `none` (only record it). The lost site is cut off from the cluster\'s network unless `none`' -r
complete -c vcfed -n "__fish_vcfed_using_subcommand cluster; and __fish_seen_subcommand_from create" -l log-format -d 'Log format on stderr. RUST_LOG sets the level (default: info for `run`, warn otherwise)' -r -f -a "text\t'Human-readable lines'
json\t'One JSON object per line'"
complete -c vcfed -n "__fish_vcfed_using_subcommand cluster; and __fish_seen_subcommand_from create" -s c -l config -d 'The site\'s config file (written by `vcfed init`), before or after the subcommand; for `vcfed init`, where to write it [default: DATA_DIR/vcfed.toml]; for `vcfed gateway`, the gateway\'s config (or VCFED_GATEWAY_CONFIG)' -r -F
complete -c vcfed -n "__fish_vcfed_using_subcommand cluster; and __fish_seen_subcommand_from create" -l wait -d 'Wait until the nodes are reserved (or the request failed), showing progress; exits non-zero if the cluster failed or was deleted meanwhile. With --json: the accepted cluster on one line at once, the settled one on a line at the end'
complete -c vcfed -n "__fish_vcfed_using_subcommand cluster; and __fish_seen_subcommand_from create" -l json -d 'Print JSON instead of text'
complete -c vcfed -n "__fish_vcfed_using_subcommand cluster; and __fish_seen_subcommand_from create" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c vcfed -n "__fish_vcfed_using_subcommand cluster; and __fish_seen_subcommand_from create" -s V -l version -d 'Print version'
complete -c vcfed -n "__fish_vcfed_using_subcommand cluster; and __fish_seen_subcommand_from list" -l state -d 'List only clusters in these states (repeatable, or a comma list): requested, reserving, reserved, starting, running, stopping, finished, failed' -r
complete -c vcfed -n "__fish_vcfed_using_subcommand cluster; and __fish_seen_subcommand_from list" -l log-format -d 'Log format on stderr. RUST_LOG sets the level (default: info for `run`, warn otherwise)' -r -f -a "text\t'Human-readable lines'
json\t'One JSON object per line'"
complete -c vcfed -n "__fish_vcfed_using_subcommand cluster; and __fish_seen_subcommand_from list" -s c -l config -d 'The site\'s config file (written by `vcfed init`), before or after the subcommand; for `vcfed init`, where to write it [default: DATA_DIR/vcfed.toml]; for `vcfed gateway`, the gateway\'s config (or VCFED_GATEWAY_CONFIG)' -r -F
complete -c vcfed -n "__fish_vcfed_using_subcommand cluster; and __fish_seen_subcommand_from list" -l all -d 'Also list finished and failed clusters'
complete -c vcfed -n "__fish_vcfed_using_subcommand cluster; and __fish_seen_subcommand_from list" -l json -d 'Print JSON instead of text'
complete -c vcfed -n "__fish_vcfed_using_subcommand cluster; and __fish_seen_subcommand_from list" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c vcfed -n "__fish_vcfed_using_subcommand cluster; and __fish_seen_subcommand_from list" -s V -l version -d 'Print version'
complete -c vcfed -n "__fish_vcfed_using_subcommand cluster; and __fish_seen_subcommand_from show" -l timeout -d 'For delete --wait: how long to wait, e.g. 90s or 10m' -r
complete -c vcfed -n "__fish_vcfed_using_subcommand cluster; and __fish_seen_subcommand_from show" -l log-format -d 'Log format on stderr. RUST_LOG sets the level (default: info for `run`, warn otherwise)' -r -f -a "text\t'Human-readable lines'
json\t'One JSON object per line'"
complete -c vcfed -n "__fish_vcfed_using_subcommand cluster; and __fish_seen_subcommand_from show" -s c -l config -d 'The site\'s config file (written by `vcfed init`), before or after the subcommand; for `vcfed init`, where to write it [default: DATA_DIR/vcfed.toml]; for `vcfed gateway`, the gateway\'s config (or VCFED_GATEWAY_CONFIG)' -r -F
complete -c vcfed -n "__fish_vcfed_using_subcommand cluster; and __fish_seen_subcommand_from show" -l wait -d 'For delete: wait until every site released its nodes, naming the sites still waited for'
complete -c vcfed -n "__fish_vcfed_using_subcommand cluster; and __fish_seen_subcommand_from show" -l json -d 'Print JSON instead of text'
complete -c vcfed -n "__fish_vcfed_using_subcommand cluster; and __fish_seen_subcommand_from show" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c vcfed -n "__fish_vcfed_using_subcommand cluster; and __fish_seen_subcommand_from show" -s V -l version -d 'Print version'
complete -c vcfed -n "__fish_vcfed_using_subcommand cluster; and __fish_seen_subcommand_from delete" -l timeout -d 'For delete --wait: how long to wait, e.g. 90s or 10m' -r
complete -c vcfed -n "__fish_vcfed_using_subcommand cluster; and __fish_seen_subcommand_from delete" -l log-format -d 'Log format on stderr. RUST_LOG sets the level (default: info for `run`, warn otherwise)' -r -f -a "text\t'Human-readable lines'
json\t'One JSON object per line'"
complete -c vcfed -n "__fish_vcfed_using_subcommand cluster; and __fish_seen_subcommand_from delete" -s c -l config -d 'The site\'s config file (written by `vcfed init`), before or after the subcommand; for `vcfed init`, where to write it [default: DATA_DIR/vcfed.toml]; for `vcfed gateway`, the gateway\'s config (or VCFED_GATEWAY_CONFIG)' -r -F
complete -c vcfed -n "__fish_vcfed_using_subcommand cluster; and __fish_seen_subcommand_from delete" -l wait -d 'For delete: wait until every site released its nodes, naming the sites still waited for'
complete -c vcfed -n "__fish_vcfed_using_subcommand cluster; and __fish_seen_subcommand_from delete" -l json -d 'Print JSON instead of text'
complete -c vcfed -n "__fish_vcfed_using_subcommand cluster; and __fish_seen_subcommand_from delete" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c vcfed -n "__fish_vcfed_using_subcommand cluster; and __fish_seen_subcommand_from delete" -s V -l version -d 'Print version'
complete -c vcfed -n "__fish_vcfed_using_subcommand cluster; and __fish_seen_subcommand_from help" -f -a "create" -d 'Ask this site for a cluster; it becomes the master and borrows nodes from other sites if it has too few'
complete -c vcfed -n "__fish_vcfed_using_subcommand cluster; and __fish_seen_subcommand_from help" -f -a "list" -d 'List the clusters this site masters or serves'
complete -c vcfed -n "__fish_vcfed_using_subcommand cluster; and __fish_seen_subcommand_from help" -f -a "show" -d 'Show one cluster with its per-site parts'
complete -c vcfed -n "__fish_vcfed_using_subcommand cluster; and __fish_seen_subcommand_from help" -f -a "delete" -d 'Delete a cluster (at its master): releases its nodes at every site'
complete -c vcfed -n "__fish_vcfed_using_subcommand cluster; and __fish_seen_subcommand_from help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c vcfed -n "__fish_vcfed_using_subcommand sites; and not __fish_seen_subcommand_from forget help" -l log-format -d 'Log format on stderr. RUST_LOG sets the level (default: info for `run`, warn otherwise)' -r -f -a "text\t'Human-readable lines'
json\t'One JSON object per line'"
complete -c vcfed -n "__fish_vcfed_using_subcommand sites; and not __fish_seen_subcommand_from forget help" -s c -l config -d 'The site\'s config file (written by `vcfed init`), before or after the subcommand; for `vcfed init`, where to write it [default: DATA_DIR/vcfed.toml]; for `vcfed gateway`, the gateway\'s config (or VCFED_GATEWAY_CONFIG)' -r -F
complete -c vcfed -n "__fish_vcfed_using_subcommand sites; and not __fish_seen_subcommand_from forget help" -l json -d 'Print JSON instead of text'
complete -c vcfed -n "__fish_vcfed_using_subcommand sites; and not __fish_seen_subcommand_from forget help" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c vcfed -n "__fish_vcfed_using_subcommand sites; and not __fish_seen_subcommand_from forget help" -s V -l version -d 'Print version'
complete -c vcfed -n "__fish_vcfed_using_subcommand sites; and not __fish_seen_subcommand_from forget help" -f -a "forget" -d 'Forget a site that vanished: drop it from this site\'s view and its remembered addresses. Refused while the site is alive, or while it holds nodes of live clusters this site masters, unless --force, which ends those parts first (each cluster heals by its policy)'
complete -c vcfed -n "__fish_vcfed_using_subcommand sites; and not __fish_seen_subcommand_from forget help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c vcfed -n "__fish_vcfed_using_subcommand sites; and __fish_seen_subcommand_from forget" -l log-format -d 'Log format on stderr. RUST_LOG sets the level (default: info for `run`, warn otherwise)' -r -f -a "text\t'Human-readable lines'
json\t'One JSON object per line'"
complete -c vcfed -n "__fish_vcfed_using_subcommand sites; and __fish_seen_subcommand_from forget" -s c -l config -d 'The site\'s config file (written by `vcfed init`), before or after the subcommand; for `vcfed init`, where to write it [default: DATA_DIR/vcfed.toml]; for `vcfed gateway`, the gateway\'s config (or VCFED_GATEWAY_CONFIG)' -r -F
complete -c vcfed -n "__fish_vcfed_using_subcommand sites; and __fish_seen_subcommand_from forget" -l force -d 'Also end its parts of live clusters mastered here'
complete -c vcfed -n "__fish_vcfed_using_subcommand sites; and __fish_seen_subcommand_from forget" -l json -d 'Print JSON instead of text'
complete -c vcfed -n "__fish_vcfed_using_subcommand sites; and __fish_seen_subcommand_from forget" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c vcfed -n "__fish_vcfed_using_subcommand sites; and __fish_seen_subcommand_from forget" -s V -l version -d 'Print version'
complete -c vcfed -n "__fish_vcfed_using_subcommand sites; and __fish_seen_subcommand_from help" -f -a "forget" -d 'Forget a site that vanished: drop it from this site\'s view and its remembered addresses. Refused while the site is alive, or while it holds nodes of live clusters this site masters, unless --force, which ends those parts first (each cluster heals by its policy)'
complete -c vcfed -n "__fish_vcfed_using_subcommand sites; and __fish_seen_subcommand_from help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c vcfed -n "__fish_vcfed_using_subcommand events" -l cluster -d 'Only the events of this cluster (id or name): its reservations, parts and nodes' -r
complete -c vcfed -n "__fish_vcfed_using_subcommand events" -l last -d 'Only the last N events before following or exiting' -r
complete -c vcfed -n "__fish_vcfed_using_subcommand events" -l log-format -d 'Log format on stderr. RUST_LOG sets the level (default: info for `run`, warn otherwise)' -r -f -a "text\t'Human-readable lines'
json\t'One JSON object per line'"
complete -c vcfed -n "__fish_vcfed_using_subcommand events" -s c -l config -d 'The site\'s config file (written by `vcfed init`), before or after the subcommand; for `vcfed init`, where to write it [default: DATA_DIR/vcfed.toml]; for `vcfed gateway`, the gateway\'s config (or VCFED_GATEWAY_CONFIG)' -r -F
complete -c vcfed -n "__fish_vcfed_using_subcommand events" -s f -l follow -d 'Keep printing events as they happen, until Ctrl-C'
complete -c vcfed -n "__fish_vcfed_using_subcommand events" -l json -d 'One JSON object per line instead of a table'
complete -c vcfed -n "__fish_vcfed_using_subcommand events" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c vcfed -n "__fish_vcfed_using_subcommand events" -s V -l version -d 'Print version'
complete -c vcfed -n "__fish_vcfed_using_subcommand join" -l log-format -d 'Log format on stderr. RUST_LOG sets the level (default: info for `run`, warn otherwise)' -r -f -a "text\t'Human-readable lines'
json\t'One JSON object per line'"
complete -c vcfed -n "__fish_vcfed_using_subcommand join" -s c -l config -d 'The site\'s config file (written by `vcfed init`), before or after the subcommand; for `vcfed init`, where to write it [default: DATA_DIR/vcfed.toml]; for `vcfed gateway`, the gateway\'s config (or VCFED_GATEWAY_CONFIG)' -r -F
complete -c vcfed -n "__fish_vcfed_using_subcommand join" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c vcfed -n "__fish_vcfed_using_subcommand join" -s V -l version -d 'Print version'
complete -c vcfed -n "__fish_vcfed_using_subcommand psk; and not __fish_seen_subcommand_from generate help" -l log-format -d 'Log format on stderr. RUST_LOG sets the level (default: info for `run`, warn otherwise)' -r -f -a "text\t'Human-readable lines'
json\t'One JSON object per line'"
complete -c vcfed -n "__fish_vcfed_using_subcommand psk; and not __fish_seen_subcommand_from generate help" -s c -l config -d 'The site\'s config file (written by `vcfed init`), before or after the subcommand; for `vcfed init`, where to write it [default: DATA_DIR/vcfed.toml]; for `vcfed gateway`, the gateway\'s config (or VCFED_GATEWAY_CONFIG)' -r -F
complete -c vcfed -n "__fish_vcfed_using_subcommand psk; and not __fish_seen_subcommand_from generate help" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c vcfed -n "__fish_vcfed_using_subcommand psk; and not __fish_seen_subcommand_from generate help" -s V -l version -d 'Print version'
complete -c vcfed -n "__fish_vcfed_using_subcommand psk; and not __fish_seen_subcommand_from generate help" -f -a "generate" -d 'Write a new random pre-shared key (mode 0600). Give the same file to every site of the federation as `federation.psk_file`'
complete -c vcfed -n "__fish_vcfed_using_subcommand psk; and not __fish_seen_subcommand_from generate help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c vcfed -n "__fish_vcfed_using_subcommand psk; and __fish_seen_subcommand_from generate" -l out -d 'Where to write it' -r -F
complete -c vcfed -n "__fish_vcfed_using_subcommand psk; and __fish_seen_subcommand_from generate" -l log-format -d 'Log format on stderr. RUST_LOG sets the level (default: info for `run`, warn otherwise)' -r -f -a "text\t'Human-readable lines'
json\t'One JSON object per line'"
complete -c vcfed -n "__fish_vcfed_using_subcommand psk; and __fish_seen_subcommand_from generate" -s c -l config -d 'The site\'s config file (written by `vcfed init`), before or after the subcommand; for `vcfed init`, where to write it [default: DATA_DIR/vcfed.toml]; for `vcfed gateway`, the gateway\'s config (or VCFED_GATEWAY_CONFIG)' -r -F
complete -c vcfed -n "__fish_vcfed_using_subcommand psk; and __fish_seen_subcommand_from generate" -l force -d 'Replace an existing file'
complete -c vcfed -n "__fish_vcfed_using_subcommand psk; and __fish_seen_subcommand_from generate" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c vcfed -n "__fish_vcfed_using_subcommand psk; and __fish_seen_subcommand_from generate" -s V -l version -d 'Print version'
complete -c vcfed -n "__fish_vcfed_using_subcommand psk; and __fish_seen_subcommand_from help" -f -a "generate" -d 'Write a new random pre-shared key (mode 0600). Give the same file to every site of the federation as `federation.psk_file`'
complete -c vcfed -n "__fish_vcfed_using_subcommand psk; and __fish_seen_subcommand_from help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c vcfed -n "__fish_vcfed_using_subcommand demo" -l dir -d 'Directory for the demo\'s sites [default: a fresh temporary directory, removed afterwards unless --keep]' -r -F
complete -c vcfed -n "__fish_vcfed_using_subcommand demo" -l report -d 'Also write the federated demo\'s outcome (nodes, phases) to this file, as JSON' -r -F
complete -c vcfed -n "__fish_vcfed_using_subcommand demo" -l instance -d 'Which demo federation: 0 is `vcfd-*` namespaces with sites `site-a`.. on 198.18.0.0/24; N is `vcfdN-*`, `siteN-a`.. on 198.18.N.0/24, so that several can run side by side (give the same number to `--down`)' -r
complete -c vcfed -n "__fish_vcfed_using_subcommand demo" -l driver -d 'What the compute nodes are: network namespaces, or libvirt virtual machines that network-boot with iPXE (needs a running libvirtd)' -r -f -a "netns\t'Network namespaces that boot with busybox (fast, needs no libvirt)'
libvirt\t'libvirt virtual machines (QEMU, software emulation) that network-boot with iPXE; needs a running libvirtd'"
complete -c vcfed -n "__fish_vcfed_using_subcommand demo" -l log-format -d 'Log format on stderr. RUST_LOG sets the level (default: info for `run`, warn otherwise)' -r -f -a "text\t'Human-readable lines'
json\t'One JSON object per line'"
complete -c vcfed -n "__fish_vcfed_using_subcommand demo" -s c -l config -d 'The site\'s config file (written by `vcfed init`), before or after the subcommand; for `vcfed init`, where to write it [default: DATA_DIR/vcfed.toml]; for `vcfed gateway`, the gateway\'s config (or VCFED_GATEWAY_CONFIG)' -r -F
complete -c vcfed -n "__fish_vcfed_using_subcommand demo" -l keep -d 'Keep the federation (or the site) running after the tour, until Ctrl-C; `vcfed demo --down` removes it from another shell'
complete -c vcfed -n "__fish_vcfed_using_subcommand demo" -l down -d 'Remove every namespace, link and process a kept (or crashed) demo federation left, and exit'
complete -c vcfed -n "__fish_vcfed_using_subcommand demo" -l local -d 'Tour one site only (what the demo does without root)'
complete -c vcfed -n "__fish_vcfed_using_subcommand demo" -l heal -d 'After the cluster runs, lose a worker site (kill its agent, cut its link): watch the master fence it and replace its nodes at the other site, then bring the site back and watch it stand down'
complete -c vcfed -n "__fish_vcfed_using_subcommand demo" -l no-install -d 'Do not install missing tools (iproute2, util-linux, dnsmasq-base, busybox-static); without this, a root run on Debian or Ubuntu installs them with apt-get first'
complete -c vcfed -n "__fish_vcfed_using_subcommand demo" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c vcfed -n "__fish_vcfed_using_subcommand demo" -s V -l version -d 'Print version'
complete -c vcfed -n "__fish_vcfed_using_subcommand gateway; and not __fish_seen_subcommand_from genkey pubkey help" -l log-format -d 'Log format on stderr. RUST_LOG sets the level (default: info for `run`, warn otherwise)' -r -f -a "text\t'Human-readable lines'
json\t'One JSON object per line'"
complete -c vcfed -n "__fish_vcfed_using_subcommand gateway; and not __fish_seen_subcommand_from genkey pubkey help" -s c -l config -d 'The site\'s config file (written by `vcfed init`), before or after the subcommand; for `vcfed init`, where to write it [default: DATA_DIR/vcfed.toml]; for `vcfed gateway`, the gateway\'s config (or VCFED_GATEWAY_CONFIG)' -r -F
complete -c vcfed -n "__fish_vcfed_using_subcommand gateway; and not __fish_seen_subcommand_from genkey pubkey help" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c vcfed -n "__fish_vcfed_using_subcommand gateway; and not __fish_seen_subcommand_from genkey pubkey help" -s V -l version -d 'Print version'
complete -c vcfed -n "__fish_vcfed_using_subcommand gateway; and not __fish_seen_subcommand_from genkey pubkey help" -f -a "genkey" -d 'Write a new WireGuard private key (base64, mode 0600) and print its public key'
complete -c vcfed -n "__fish_vcfed_using_subcommand gateway; and not __fish_seen_subcommand_from genkey pubkey help" -f -a "pubkey" -d 'Print the public key of a private key file'
complete -c vcfed -n "__fish_vcfed_using_subcommand gateway; and not __fish_seen_subcommand_from genkey pubkey help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c vcfed -n "__fish_vcfed_using_subcommand gateway; and __fish_seen_subcommand_from genkey" -l out -d 'Where to write the key' -r -F
complete -c vcfed -n "__fish_vcfed_using_subcommand gateway; and __fish_seen_subcommand_from genkey" -l log-format -d 'Log format on stderr. RUST_LOG sets the level (default: info for `run`, warn otherwise)' -r -f -a "text\t'Human-readable lines'
json\t'One JSON object per line'"
complete -c vcfed -n "__fish_vcfed_using_subcommand gateway; and __fish_seen_subcommand_from genkey" -s c -l config -d 'The site\'s config file (written by `vcfed init`), before or after the subcommand; for `vcfed init`, where to write it [default: DATA_DIR/vcfed.toml]; for `vcfed gateway`, the gateway\'s config (or VCFED_GATEWAY_CONFIG)' -r -F
complete -c vcfed -n "__fish_vcfed_using_subcommand gateway; and __fish_seen_subcommand_from genkey" -l force -d 'Replace an existing file'
complete -c vcfed -n "__fish_vcfed_using_subcommand gateway; and __fish_seen_subcommand_from genkey" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c vcfed -n "__fish_vcfed_using_subcommand gateway; and __fish_seen_subcommand_from genkey" -s V -l version -d 'Print version'
complete -c vcfed -n "__fish_vcfed_using_subcommand gateway; and __fish_seen_subcommand_from pubkey" -l key -d 'The private key file' -r -F
complete -c vcfed -n "__fish_vcfed_using_subcommand gateway; and __fish_seen_subcommand_from pubkey" -l log-format -d 'Log format on stderr. RUST_LOG sets the level (default: info for `run`, warn otherwise)' -r -f -a "text\t'Human-readable lines'
json\t'One JSON object per line'"
complete -c vcfed -n "__fish_vcfed_using_subcommand gateway; and __fish_seen_subcommand_from pubkey" -s c -l config -d 'The site\'s config file (written by `vcfed init`), before or after the subcommand; for `vcfed init`, where to write it [default: DATA_DIR/vcfed.toml]; for `vcfed gateway`, the gateway\'s config (or VCFED_GATEWAY_CONFIG)' -r -F
complete -c vcfed -n "__fish_vcfed_using_subcommand gateway; and __fish_seen_subcommand_from pubkey" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c vcfed -n "__fish_vcfed_using_subcommand gateway; and __fish_seen_subcommand_from pubkey" -s V -l version -d 'Print version'
complete -c vcfed -n "__fish_vcfed_using_subcommand gateway; and __fish_seen_subcommand_from help" -f -a "genkey" -d 'Write a new WireGuard private key (base64, mode 0600) and print its public key'
complete -c vcfed -n "__fish_vcfed_using_subcommand gateway; and __fish_seen_subcommand_from help" -f -a "pubkey" -d 'Print the public key of a private key file'
complete -c vcfed -n "__fish_vcfed_using_subcommand gateway; and __fish_seen_subcommand_from help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c vcfed -n "__fish_vcfed_using_subcommand simnet" -l sites -d 'Number of sites' -r
complete -c vcfed -n "__fish_vcfed_using_subcommand simnet" -l seed -d 'Seed of the run: the same seed replays the same run' -r
complete -c vcfed -n "__fish_vcfed_using_subcommand simnet" -l seeds -d 'Sweep seeds A..B (B excluded) or A..=B' -r
complete -c vcfed -n "__fish_vcfed_using_subcommand simnet" -l duration -d 'Simulated time, e.g. 30m, 2h' -r
complete -c vcfed -n "__fish_vcfed_using_subcommand simnet" -l faults -d 'Faults, comma-separated: loss, dup, reorder, partition, crash, skew, bandwidth, join, leave, gateway, site-loss, or all / none' -r
complete -c vcfed -n "__fish_vcfed_using_subcommand simnet" -l calm -d 'Faults stop this long before the end; the invariants that say "eventually" are checked in this calm' -r
complete -c vcfed -n "__fish_vcfed_using_subcommand simnet" -l requests-per-site-hour -d 'Cluster requests per site per simulated hour' -r
complete -c vcfed -n "__fish_vcfed_using_subcommand simnet" -l window-start -d 'When a requested window starts, after the request: MIN..MAX' -r
complete -c vcfed -n "__fish_vcfed_using_subcommand simnet" -l window-length -d 'How long a requested window is: MIN..MAX' -r
complete -c vcfed -n "__fish_vcfed_using_subcommand simnet" -l loss -d 'Message loss probability (with the `loss` fault)' -r
complete -c vcfed -n "__fish_vcfed_using_subcommand simnet" -l dup -d 'Duplication probability (with the `dup` fault)' -r
complete -c vcfed -n "__fish_vcfed_using_subcommand simnet" -l mesh-degree -d 'Gossip mesh degree' -r
complete -c vcfed -n "__fish_vcfed_using_subcommand simnet" -l nodes-max -d 'Most compute nodes one request asks for' -r
complete -c vcfed -n "__fish_vcfed_using_subcommand simnet" -l capacity-max -d 'Node slots of the largest site (the smallest has 4)' -r
complete -c vcfed -n "__fish_vcfed_using_subcommand simnet" -l advert-refresh -d 'Advert refresh period [default: 10s up to 100 sites, then 0.6 s per site]' -r
complete -c vcfed -n "__fish_vcfed_using_subcommand simnet" -l anti-entropy -d 'Anti-entropy period [default: 2s up to 100 sites, then 20 ms per site]' -r
complete -c vcfed -n "__fish_vcfed_using_subcommand simnet" -l plant-bug -d 'Plant a bug to check that the invariants catch it' -r -f -a "commit-without-hold\t''
leak-vlan\t''
no-reserve-deadline\t''
replace-without-fence\t''"
complete -c vcfed -n "__fish_vcfed_using_subcommand simnet" -l log-format -d 'Log format on stderr. RUST_LOG sets the level (default: info for `run`, warn otherwise)' -r -f -a "text\t'Human-readable lines'
json\t'One JSON object per line'"
complete -c vcfed -n "__fish_vcfed_using_subcommand simnet" -s c -l config -d 'The site\'s config file (written by `vcfed init`), before or after the subcommand; for `vcfed init`, where to write it [default: DATA_DIR/vcfed.toml]; for `vcfed gateway`, the gateway\'s config (or VCFED_GATEWAY_CONFIG)' -r -F
complete -c vcfed -n "__fish_vcfed_using_subcommand simnet" -l json -d 'Print the report as JSON on stdout'
complete -c vcfed -n "__fish_vcfed_using_subcommand simnet" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c vcfed -n "__fish_vcfed_using_subcommand simnet" -s V -l version -d 'Print version'
complete -c vcfed -n "__fish_vcfed_using_subcommand completions" -l log-format -d 'Log format on stderr. RUST_LOG sets the level (default: info for `run`, warn otherwise)' -r -f -a "text\t'Human-readable lines'
json\t'One JSON object per line'"
complete -c vcfed -n "__fish_vcfed_using_subcommand completions" -s c -l config -d 'The site\'s config file (written by `vcfed init`), before or after the subcommand; for `vcfed init`, where to write it [default: DATA_DIR/vcfed.toml]; for `vcfed gateway`, the gateway\'s config (or VCFED_GATEWAY_CONFIG)' -r -F
complete -c vcfed -n "__fish_vcfed_using_subcommand completions" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c vcfed -n "__fish_vcfed_using_subcommand completions" -s V -l version -d 'Print version'
complete -c vcfed -n "__fish_vcfed_using_subcommand man" -l log-format -d 'Log format on stderr. RUST_LOG sets the level (default: info for `run`, warn otherwise)' -r -f -a "text\t'Human-readable lines'
json\t'One JSON object per line'"
complete -c vcfed -n "__fish_vcfed_using_subcommand man" -s c -l config -d 'The site\'s config file (written by `vcfed init`), before or after the subcommand; for `vcfed init`, where to write it [default: DATA_DIR/vcfed.toml]; for `vcfed gateway`, the gateway\'s config (or VCFED_GATEWAY_CONFIG)' -r -F
complete -c vcfed -n "__fish_vcfed_using_subcommand man" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c vcfed -n "__fish_vcfed_using_subcommand man" -s V -l version -d 'Print version'
complete -c vcfed -n "__fish_vcfed_using_subcommand help; and not __fish_seen_subcommand_from init run status capacity reservation cluster sites events join psk demo gateway simnet completions man help" -f -a "init" -d 'Create a site: write a commented config and generate the site\'s keys and API token'
complete -c vcfed -n "__fish_vcfed_using_subcommand help; and not __fish_seen_subcommand_from init run status capacity reservation cluster sites events join psk demo gateway simnet completions man help" -f -a "run" -d 'Run the site agent until SIGTERM or Ctrl-C'
complete -c vcfed -n "__fish_vcfed_using_subcommand help; and not __fish_seen_subcommand_from init run status capacity reservation cluster sites events join psk demo gateway simnet completions man help" -f -a "status" -d 'Show the site: name, peer id, capacity'
complete -c vcfed -n "__fish_vcfed_using_subcommand help; and not __fish_seen_subcommand_from init run status capacity reservation cluster sites events join psk demo gateway simnet completions man help" -f -a "capacity" -d 'Show free nodes over a time window, as steps'
complete -c vcfed -n "__fish_vcfed_using_subcommand help; and not __fish_seen_subcommand_from init run status capacity reservation cluster sites events join psk demo gateway simnet completions man help" -f -a "reservation" -d 'Hold, commit, release and list local reservations'
complete -c vcfed -n "__fish_vcfed_using_subcommand help; and not __fish_seen_subcommand_from init run status capacity reservation cluster sites events join psk demo gateway simnet completions man help" -f -a "cluster" -d 'Create, list, show and delete virtual clusters'
complete -c vcfed -n "__fish_vcfed_using_subcommand help; and not __fish_seen_subcommand_from init run status capacity reservation cluster sites events join psk demo gateway simnet completions man help" -f -a "sites" -d 'List the federation\'s sites as this site sees them'
complete -c vcfed -n "__fish_vcfed_using_subcommand help; and not __fish_seen_subcommand_from init run status capacity reservation cluster sites events join psk demo gateway simnet completions man help" -f -a "events" -d 'Show the site\'s event log (all of it, or one cluster\'s), and with --follow as it grows'
complete -c vcfed -n "__fish_vcfed_using_subcommand help; and not __fish_seen_subcommand_from init run status capacity reservation cluster sites events join psk demo gateway simnet completions man help" -f -a "join" -d 'Connect the running agent to a federation member'
complete -c vcfed -n "__fish_vcfed_using_subcommand help; and not __fish_seen_subcommand_from init run status capacity reservation cluster sites events join psk demo gateway simnet completions man help" -f -a "psk" -d 'Federation pre-shared keys (private federations)'
complete -c vcfed -n "__fish_vcfed_using_subcommand help; and not __fish_seen_subcommand_from init run status capacity reservation cluster sites events join psk demo gateway simnet completions man help" -f -a "demo" -d 'Run a demo on this machine: as root, a federation of three sites in network namespaces builds one cluster from all their nodes; without root (or with --local), a tour of one site'
complete -c vcfed -n "__fish_vcfed_using_subcommand help; and not __fish_seen_subcommand_from init run status capacity reservation cluster sites events join psk demo gateway simnet completions man help" -f -a "gateway" -d 'Run the overlay data plane alone (`--config FILE`), for debugging and benchmarks; `genkey` and `pubkey` make its WireGuard keys'
complete -c vcfed -n "__fish_vcfed_using_subcommand help; and not __fish_seen_subcommand_from init run status capacity reservation cluster sites events join psk demo gateway simnet completions man help" -f -a "simnet" -d 'Simulate a whole federation on a virtual clock under faults and check its invariants (deterministic: a seed replays a run)'
complete -c vcfed -n "__fish_vcfed_using_subcommand help; and not __fish_seen_subcommand_from init run status capacity reservation cluster sites events join psk demo gateway simnet completions man help" -f -a "completions" -d 'Print a shell completion script: `vcfed completions bash > /etc/bash_completion.d/vcfed` (or zsh, fish, elvish, powershell)'
complete -c vcfed -n "__fish_vcfed_using_subcommand help; and not __fish_seen_subcommand_from init run status capacity reservation cluster sites events join psk demo gateway simnet completions man help" -f -a "man" -d 'Print the manual page (roff): `vcfed man > /usr/share/man/man1/vcfed.1`'
complete -c vcfed -n "__fish_vcfed_using_subcommand help; and not __fish_seen_subcommand_from init run status capacity reservation cluster sites events join psk demo gateway simnet completions man help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c vcfed -n "__fish_vcfed_using_subcommand help; and __fish_seen_subcommand_from reservation" -f -a "hold" -d 'Hold nodes for a window; the hold expires after its lease unless committed'
complete -c vcfed -n "__fish_vcfed_using_subcommand help; and __fish_seen_subcommand_from reservation" -f -a "commit" -d 'Commit a hold'
complete -c vcfed -n "__fish_vcfed_using_subcommand help; and __fish_seen_subcommand_from reservation" -f -a "release" -d 'Release a hold or a commitment'
complete -c vcfed -n "__fish_vcfed_using_subcommand help; and __fish_seen_subcommand_from reservation" -f -a "list" -d 'List reservations that take capacity (or all with --all)'
complete -c vcfed -n "__fish_vcfed_using_subcommand help; and __fish_seen_subcommand_from cluster" -f -a "create" -d 'Ask this site for a cluster; it becomes the master and borrows nodes from other sites if it has too few'
complete -c vcfed -n "__fish_vcfed_using_subcommand help; and __fish_seen_subcommand_from cluster" -f -a "list" -d 'List the clusters this site masters or serves'
complete -c vcfed -n "__fish_vcfed_using_subcommand help; and __fish_seen_subcommand_from cluster" -f -a "show" -d 'Show one cluster with its per-site parts'
complete -c vcfed -n "__fish_vcfed_using_subcommand help; and __fish_seen_subcommand_from cluster" -f -a "delete" -d 'Delete a cluster (at its master): releases its nodes at every site'
complete -c vcfed -n "__fish_vcfed_using_subcommand help; and __fish_seen_subcommand_from sites" -f -a "forget" -d 'Forget a site that vanished: drop it from this site\'s view and its remembered addresses. Refused while the site is alive, or while it holds nodes of live clusters this site masters, unless --force, which ends those parts first (each cluster heals by its policy)'
complete -c vcfed -n "__fish_vcfed_using_subcommand help; and __fish_seen_subcommand_from psk" -f -a "generate" -d 'Write a new random pre-shared key (mode 0600). Give the same file to every site of the federation as `federation.psk_file`'
complete -c vcfed -n "__fish_vcfed_using_subcommand help; and __fish_seen_subcommand_from gateway" -f -a "genkey" -d 'Write a new WireGuard private key (base64, mode 0600) and print its public key'
complete -c vcfed -n "__fish_vcfed_using_subcommand help; and __fish_seen_subcommand_from gateway" -f -a "pubkey" -d 'Print the public key of a private key file'
