//! The CLI's output on stdout, and what a closed stdout means.
//!
//! A reader that stops early (`vcfed sites | head -1`) closes the pipe, and
//! the next write fails with `EPIPE`: Rust ignores `SIGPIPE`, and the
//! workspace denies the unsafe code that would restore its default. Where
//! `println!` would panic then, [`line`] unwinds with a [`StdoutFailed`]
//! payload, without the panic message: the destructors on the way run (the
//! demo's agents are killed and its namespaces removed) and
//! [`crate::cli::main`] turns it into an exit code. Every print of the CLI
//! goes through [`outln!`](crate::outln).

use std::io::Write;

/// The payload a failed write to stdout unwinds with.
#[derive(Debug)]
pub struct StdoutFailed(pub std::io::Error);

impl StdoutFailed {
    /// Whether the reader went away: the command ends quietly then.
    pub fn is_closed(&self) -> bool {
        self.0.kind() == std::io::ErrorKind::BrokenPipe
    }
}

/// Writes one line to stdout; on failure, unwinds with [`StdoutFailed`].
pub fn line(args: std::fmt::Arguments<'_>) {
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = stdout
        .write_fmt(args)
        .and_then(|()| stdout.write_all(b"\n"))
    {
        // `resume_unwind` skips the panic hook: nothing is printed.
        std::panic::resume_unwind(Box::new(StdoutFailed(e)));
    }
}
