//! The `kiln` command line: clap types in [`args`], and one function per command, grouped by
//! what it works on, each printing its own report.

pub mod args;
pub mod models;
pub mod tools;
pub mod train;
