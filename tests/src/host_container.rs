//! Containers of a host-mode agent (as root, in namespaces it creates), for fast tests of
//! the agent's container setup: a busybox share, process specs, and one process run to its
//! end with its output captured.

use agent_protocol::{ContainerSpec, Mount, ProcessSpec, Share};
use runtime_cli::agent_client::{start_process, ClientError, Launch};
use runtime_cli::relay::HostIo;

use crate::{
    agent_bin, busybox, busybox_rootfs, default_container_spec, Capture, HostAgent, TempDir,
};

/// Why host-mode containers cannot run here.
pub fn unavailable() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    agent_bin()
        .err()
        .or_else(|| busybox().err())
        .or_else(|| (!root).then(|| "containers need root".to_string()))
}

/// A process running `args` with a plain PATH.
pub fn spec(args: &[&str]) -> ProcessSpec {
    ProcessSpec {
        args: args.iter().map(|s| s.to_string()).collect(),
        env: vec!["PATH=/bin:/sbin:/usr/bin:/usr/sbin".into()],
        cwd: "/".into(),
        ..Default::default()
    }
}

/// A share with a busybox rootfs, and a container spec for it.
pub fn share(dir: &TempDir) -> ContainerSpec {
    busybox_rootfs(&dir.path().join("rootfs")).unwrap();
    std::fs::create_dir_all(dir.path().join("mounts")).unwrap();
    default_container_spec(Share::Directory {
        path: dir.path().to_string_lossy().into_owned(),
    })
}

/// A bind mount of `share_source` (a path in the share) on `dest`.
pub fn bind(share_source: &str, dest: &str, opts: &[&str]) -> Mount {
    Mount {
        destination: dest.into(),
        kind: "bind".into(),
        source: share_source.into(),
        options: opts.iter().map(|s| s.to_string()).collect(),
        share_source: true,
    }
}

/// How a process ended and what it printed.
#[derive(Debug)]
pub struct Out {
    pub status: i32,
    pub out: String,
    pub err: String,
}

/// Runs `args` as process `id` to its end.
pub fn run(agent: &HostAgent, id: &str, args: &[&str], launch: Launch) -> Result<Out, ClientError> {
    let client = agent.client();
    let mut control = client.control()?;
    let (out, err) = (Capture::default(), Capture::default());
    let stdio = HostIo::Pipes {
        stdin: None,
        stdout: Some(Box::new(out.clone())),
        stderr: Some(Box::new(err.clone())),
    };
    let p = start_process(&client, &mut control, id, spec(args), stdio, launch)?;
    let status = p.finish(&mut control)?;
    Ok(Out {
        status,
        out: out.text(),
        err: err.text(),
    })
}

/// The launch of a container's init process.
pub fn init(c: ContainerSpec) -> Launch {
    Launch {
        init: true,
        container: Some(c),
    }
}
