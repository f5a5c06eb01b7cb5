//! The commands behind `shardvol`: each file holds one family, turns its arguments into calls
//! into the library and prints the answer. `args` is the command line itself (clap types).

pub(crate) mod args;
pub(crate) mod audit;
pub(crate) mod config;
pub(crate) mod disks;
pub(crate) mod keys;
pub(crate) mod pool;
mod report;
pub(crate) mod serve;
