//! The runvm runtime as a library: asset lookup, logging, the agent client and the
//! VM-with-agent sandbox. The `runvm` binary (main.rs) is the command line on top.

pub mod agent_client;
pub mod assets;
pub mod bundle;
pub mod cgroup;
pub mod console;
pub mod container;
pub mod control;
pub mod hooks;
pub mod logging;
pub mod sandbox;
pub mod share;
pub mod state;
pub mod supervisor;
pub mod translate;
pub mod util;
