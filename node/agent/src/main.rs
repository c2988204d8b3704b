//! The `vcfed` binary: see the `vcfed` library crate and `vcfed --help`.

fn main() -> std::process::ExitCode {
    vcfed::cli::main()
}
