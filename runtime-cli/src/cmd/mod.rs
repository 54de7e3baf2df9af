//! One module per runvm verb.

pub mod boot;
pub mod create;
pub mod delete;
pub mod events;
pub mod exec;
pub mod features;
pub mod kill;
pub mod list;
pub mod pause;
pub mod ps;
pub mod run;
pub mod spec;
pub mod start;
pub mod state;
pub mod template;
pub mod update;
pub mod vm_run;
pub mod vmm_serve;
