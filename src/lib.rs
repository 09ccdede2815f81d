//! kiln: a portable trainer for the Llama 2 recipe on Burn.
//!
//! Where things live (`docs/architecture.md` has a line per module):
//! [`stages`] holds the recipe, one file per stage; [`train`] the pieces every stage shares
//! (optimizer step, run directory, supervised loop, metrics); [`model`] the Llama and its
//! reference ops, with [`kernels`] the fused WGSL versions; [`data`] corpora, tokenizer and
//! chat formats; [`infer`] generation and chat; [`interop`] models on disk in every format;
//! [`gym`] the verifiable task suite; [`config`], [`device`], [`bench`] and the command line in `main.rs`.

pub mod bench;
pub mod config;
pub mod data;
pub mod device;
pub mod gym;
pub mod infer;
pub mod interop;
pub mod kernels;
pub mod model;
pub mod stages;
pub mod train;
