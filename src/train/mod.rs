//! The pieces every training stage shares: the optimizer, the supervised loop, metrics,
//! progress and plots.

pub mod collective;
pub mod metrics;
pub mod optim;
pub mod plot;
pub mod ppo_objective;
pub mod progress;
pub mod run_dir;
pub mod stage;
pub mod step;
pub mod supervised;
