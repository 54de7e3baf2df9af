//! The container's OCI seccomp profile compiled with libseccomp (linked statically into
//! the agent) into a filter loaded just before the process execs. Unknown system calls,
//! architectures, actions and comparisons are errors: a profile that cannot be applied
//! exactly fails `create`.

use std::str::FromStr;

use agent_protocol::{Seccomp, SeccompArg, SeccompRule};
use libseccomp::{
    ScmpAction, ScmpArch, ScmpArgCompare, ScmpCompareOp, ScmpFilterContext, ScmpSyscall,
};

/// Why a profile cannot be compiled.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("seccomp: unknown system call {0:?}")]
    Syscall(String),
    #[error("seccomp: unknown architecture {0:?}")]
    Arch(String),
    #[error("seccomp: unsupported action {0:?}")]
    Action(String),
    #[error("seccomp: unknown comparison {0:?}")]
    Op(String),
    #[error("seccomp: unknown flag {0:?}")]
    Flag(String),
    #[error("seccomp: rule for {name}: {source}")]
    Rule {
        name: String,
        #[source]
        source: libseccomp::error::SeccompError,
    },
    #[error("seccomp: {0}")]
    Library(#[from] libseccomp::error::SeccompError),
}

/// The errno an ERRNO action returns when the profile gives none.
const DEFAULT_ERRNO: u32 = libc::EPERM as u32;

fn action(name: &str, errno: Option<u32>) -> Result<ScmpAction, SeccompError> {
    let val = match name {
        "SCMP_ACT_ERRNO" => Some(errno.unwrap_or(DEFAULT_ERRNO) as i32),
        "SCMP_ACT_TRACE" => Some(errno.unwrap_or(DEFAULT_ERRNO) as i32),
        _ => None,
    };
    match name {
        "SCMP_ACT_NOTIFY" => Err(SeccompError::Action(name.into())),
        _ => ScmpAction::from_str(name, val).map_err(|_| SeccompError::Action(name.into())),
    }
}

fn compare(a: &SeccompArg) -> Result<ScmpArgCompare, SeccompError> {
    let op = ScmpCompareOp::from_str(&a.op).map_err(|_| SeccompError::Op(a.op.clone()))?;
    Ok(match op {
        // OCI: the mask is `value`, the value compared with is `valueTwo`.
        ScmpCompareOp::MaskedEqual(_) => {
            ScmpArgCompare::new(a.index, ScmpCompareOp::MaskedEqual(a.value), a.value_two)
        }
        op => ScmpArgCompare::new(a.index, op, a.value),
    })
}

/// A compiled filter, ready to load.
#[derive(Debug)]
pub struct Filter(ScmpFilterContext);

impl Filter {
    /// Compiles `profile`.
    pub fn compile(profile: &Seccomp) -> Result<Self, SeccompError> {
        let default = action(&profile.default_action, profile.default_errno_ret)?;
        let mut ctx = ScmpFilterContext::new(default)?;
        for a in &profile.architectures {
            let arch = ScmpArch::from_str(a).map_err(|_| SeccompError::Arch(a.clone()))?;
            match ctx.add_arch(arch) {
                Ok(_) => {}
                // The native architecture is in every filter already.
                Err(e) if e.errno() == Some(libseccomp::error::SeccompErrno::EEXIST) => {}
                Err(e) => return Err(e.into()),
            }
        }
        for f in &profile.flags {
            match f.as_str() {
                "SECCOMP_FILTER_FLAG_TSYNC" => ctx.set_ctl_tsync(true)?,
                "SECCOMP_FILTER_FLAG_LOG" => ctx.set_ctl_log(true)?,
                "SECCOMP_FILTER_FLAG_SPEC_ALLOW" => ctx.set_ctl_ssb(true)?,
                other => return Err(SeccompError::Flag(other.into())),
            };
        }
        // The agent sets no_new_privileges itself, as the spec says.
        ctx.set_ctl_nnp(false)?;
        for rule in &profile.syscalls {
            add_rule(&mut ctx, rule, default)?;
        }
        Ok(Filter(ctx))
    }

    /// Loads the filter into the calling thread (and, with TSYNC, its process).
    pub fn load(&self) -> Result<(), libseccomp::error::SeccompError> {
        self.0.load()
    }
}

fn add_rule(
    ctx: &mut ScmpFilterContext,
    rule: &SeccompRule,
    default: ScmpAction,
) -> Result<(), SeccompError> {
    let act = action(&rule.action, rule.errno_ret)?;
    let cmps = rule
        .args
        .iter()
        .map(compare)
        .collect::<Result<Vec<_>, _>>()?;
    // Two conditions on one argument cannot be joined (libseccomp refuses them): as runc,
    // each becomes a rule of its own, any of which matches.
    let mut indexes: Vec<u32> = rule.args.iter().map(|a| a.index).collect();
    indexes.sort_unstable();
    let split = indexes.windows(2).any(|w| w[0] == w[1]);
    for name in &rule.names {
        let sc = ScmpSyscall::from_name(name).map_err(|_| SeccompError::Syscall(name.clone()))?;
        if act == default {
            // A rule that does what the default does adds nothing (libseccomp refuses it).
            continue;
        }
        let rule_err = |source| SeccompError::Rule {
            name: name.clone(),
            source,
        };
        if cmps.is_empty() {
            ctx.add_rule(act, sc).map_err(rule_err)?;
        } else if split {
            for c in &cmps {
                ctx.add_rule_conditional(act, sc, &[*c]).map_err(rule_err)?;
            }
        } else {
            ctx.add_rule_conditional(act, sc, &cmps).map_err(rule_err)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile(v: serde_json::Value) -> Seccomp {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn profiles_compile_and_bad_ones_say_why() {
        let ok = profile(serde_json::json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
            "syscalls": [
                {"names": ["mkdirat", "chroot"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38},
                {"names": ["personality"], "action": "SCMP_ACT_ERRNO", "args": [
                    {"index": 0, "value": 0, "op": "SCMP_CMP_NE"},
                    {"index": 0, "value": 8, "op": "SCMP_CMP_NE"}]},
                {"names": ["clone"], "action": "SCMP_ACT_ERRNO", "args": [
                    {"index": 0, "value": 2114060288, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"}]}
            ]
        }));
        Filter::compile(&ok).unwrap();
        let cases = [
            (
                serde_json::json!({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["no_such_call"], "action": "SCMP_ACT_ERRNO"}]}),
                "no_such_call",
            ),
            (
                serde_json::json!({"defaultAction": "SCMP_ACT_ALLOW", "architectures": ["SCMP_ARCH_VAX"]}),
                "SCMP_ARCH_VAX",
            ),
            (
                serde_json::json!({"defaultAction": "SCMP_ACT_NOTIFY"}),
                "SCMP_ACT_NOTIFY",
            ),
        ];
        for (v, needle) in cases {
            let e = Filter::compile(&profile(v)).unwrap_err().to_string();
            assert!(e.contains(needle), "{e}");
        }
    }
}
