//! The runvm runtime as a library: the container lifecycle (`lifecycle`, `exec`), the
//! VMM process (`supervisor`), bundle translation, state, cgroups, hooks, the agent client
//! and the relay of a guest process's stdio and signals. The `runvm` binary (main.rs) is
//! the command line on top.

pub mod agent_client;
pub mod assets;
pub mod bundle;
pub mod cgroup;
pub mod console;
pub mod container;
pub mod control;
pub mod exec;
pub mod fuzzing;
pub mod hooks;
pub mod initramfs;
pub mod lifecycle;
pub mod logging;
pub mod network;
pub mod ready;
pub mod relay;
pub mod sandbox;
pub mod share;
pub mod state;
pub mod supervisor;
pub mod template;
pub mod translate;
pub mod util;
pub mod vm_run;
