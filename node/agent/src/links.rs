//! Names and sizes of the links the agent's gateway creates: a leaf module
//! that the config checks, the runner shell and the demo all read.

/// Prefix of the links the agent's gateway creates.
pub(crate) const LINK_PREFIX: &str = "vcf";
/// Inner MTU of the agent's gateway: a 1500-byte WAN path.
pub(crate) const INNER_MTU: usize = 1440;
