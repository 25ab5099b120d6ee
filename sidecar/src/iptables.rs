//! `medmesh-sidecar init`: redirects the pod's TCP traffic through the sidecar with iptables
//! (nat table), like linkerd2-proxy-init and istio-cni do.
//!
//! Inbound: every TCP connection arriving from outside goes to the inbound listener, except the
//! admin port and the configured skip ports. Outbound: every TCP connection the application
//! opens goes to the outbound listener, except connections made by the proxy's own UID (which
//! would loop), loopback, and the configured skip ports and CIDRs. The rules live in chains of
//! our own, flushed and refilled on every run, so running init twice changes nothing.

use std::process::Command;

use medmesh_core::policy::Cidr;

const IN_CHAIN: &str = "MEDMESH_INBOUND";
const IN_REDIRECT: &str = "MEDMESH_IN_REDIRECT";
const OUT_CHAIN: &str = "MEDMESH_OUTPUT";
const OUT_REDIRECT: &str = "MEDMESH_OUT_REDIRECT";

/// Settings of `init`.
#[derive(Debug, Clone, clap::Args)]
pub struct InitArgs {
    /// UID the proxy runs as: its own connections are never redirected.
    #[arg(long, env = "MEDMESH_PROXY_UID", default_value_t = 1337)]
    pub proxy_uid: u32,
    /// Port of the inbound listener.
    #[arg(long, env = "MEDMESH_INBOUND_PORT", default_value_t = 15006)]
    pub inbound_port: u16,
    /// Port of the outbound listener.
    #[arg(long, env = "MEDMESH_OUTBOUND_PORT", default_value_t = 15001)]
    pub outbound_port: u16,
    /// Port of the admin listener (probes reach it directly).
    #[arg(long, env = "MEDMESH_ADMIN_PORT", default_value_t = 15020)]
    pub admin_port: u16,
    /// Inbound ports not to intercept (comma-separated).
    #[arg(long, env = "MEDMESH_SKIP_INBOUND_PORTS", value_delimiter = ',')]
    pub skip_inbound_ports: Vec<u16>,
    /// Outbound ports not to intercept (comma-separated).
    #[arg(long, env = "MEDMESH_SKIP_OUTBOUND_PORTS", value_delimiter = ',')]
    pub skip_outbound_ports: Vec<u16>,
    /// Outbound destination CIDRs not to intercept (comma-separated).
    #[arg(long, env = "MEDMESH_SKIP_OUTBOUND_CIDRS", value_delimiter = ',')]
    pub skip_outbound_cidrs: Vec<String>,
    /// iptables flavour: auto (the `iptables` on PATH), nft or legacy.
    #[arg(long, env = "MEDMESH_IPTABLES_MODE", default_value = "auto")]
    pub mode: String,
    /// Print the commands instead of running them.
    #[arg(long)]
    pub dry_run: bool,
}

/// Why init failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InitError {
    /// A setting is invalid.
    #[error("invalid init settings: {}", .0.join("; "))]
    Invalid(Vec<String>),
    /// iptables is missing.
    #[error("cannot run {bin}: {source}")]
    Missing {
        /// Binary.
        bin: String,
        /// Error.
        source: std::io::Error,
    },
    /// The process lacks NET_ADMIN.
    #[error(
        "{bin} was refused permission (`{cmd}`): medmesh-sidecar init needs the NET_ADMIN and NET_RAW capabilities in the pod's network namespace"
    )]
    Permission {
        /// Binary.
        bin: String,
        /// The command.
        cmd: String,
    },
    /// Any other iptables failure.
    #[error("`{cmd}` failed: {stderr}")]
    Failed {
        /// The command.
        cmd: String,
        /// Its error output.
        stderr: String,
    },
}

/// One iptables invocation; `check_first` makes it conditional on `-C` not matching.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// Arguments after the binary name.
    pub args: Vec<String>,
    /// Run only if this `-C` check fails (the rule is absent).
    pub unless_present: Option<Vec<String>>,
    /// Failure is expected when the chain already exists (`-N`).
    pub may_fail: bool,
}

fn step(args: &[&str]) -> Step {
    Step {
        args: args.iter().map(|s| s.to_string()).collect(),
        unless_present: None,
        may_fail: false,
    }
}

/// The iptables commands for these settings, in order.
///
/// # Errors
/// When a setting is invalid.
pub fn plan(a: &InitArgs) -> Result<Vec<Step>, InitError> {
    let mut errs = Vec::new();
    for c in &a.skip_outbound_cidrs {
        if let Err(e) = Cidr::parse(c) {
            errs.push(format!("skip-outbound-cidrs: {e}"));
        }
    }
    if !matches!(a.mode.as_str(), "auto" | "nft" | "legacy") {
        errs.push(format!("mode {:?}: must be auto, nft or legacy", a.mode));
    }
    let ports = [a.inbound_port, a.outbound_port, a.admin_port];
    if ports[0] == ports[1] || ports[1] == ports[2] || ports[0] == ports[2] || ports.contains(&0) {
        errs.push(format!(
            "inbound, outbound and admin ports must be distinct and non-zero, got {ports:?}"
        ));
    }
    if !errs.is_empty() {
        return Err(InitError::Invalid(errs));
    }
    let mut s = Vec::new();
    for chain in [IN_CHAIN, IN_REDIRECT, OUT_CHAIN, OUT_REDIRECT] {
        // Create (fails harmlessly if it exists), then empty: re-running converges.
        s.push(Step {
            may_fail: true,
            ..step(&["-t", "nat", "-N", chain])
        });
        s.push(step(&["-t", "nat", "-F", chain]));
    }
    let inbound = a.inbound_port.to_string();
    let outbound = a.outbound_port.to_string();
    s.push(step(&[
        "-t",
        "nat",
        "-A",
        IN_REDIRECT,
        "-p",
        "tcp",
        "-j",
        "REDIRECT",
        "--to-ports",
        &inbound,
    ]));
    s.push(step(&[
        "-t",
        "nat",
        "-A",
        IN_CHAIN,
        "-p",
        "tcp",
        "--dport",
        &a.admin_port.to_string(),
        "-j",
        "RETURN",
    ]));
    s.push(step(&[
        "-t", "nat", "-A", IN_CHAIN, "-p", "tcp", "--dport", &inbound, "-j", "RETURN",
    ]));
    for p in &a.skip_inbound_ports {
        s.push(step(&[
            "-t",
            "nat",
            "-A",
            IN_CHAIN,
            "-p",
            "tcp",
            "--dport",
            &p.to_string(),
            "-j",
            "RETURN",
        ]));
    }
    s.push(step(&[
        "-t",
        "nat",
        "-A",
        IN_CHAIN,
        "-p",
        "tcp",
        "-j",
        IN_REDIRECT,
    ]));
    s.push(step(&[
        "-t",
        "nat",
        "-A",
        OUT_REDIRECT,
        "-p",
        "tcp",
        "-j",
        "REDIRECT",
        "--to-ports",
        &outbound,
    ]));
    s.push(step(&[
        "-t",
        "nat",
        "-A",
        OUT_CHAIN,
        "-m",
        "owner",
        "--uid-owner",
        &a.proxy_uid.to_string(),
        "-j",
        "RETURN",
    ]));
    s.push(step(&[
        "-t", "nat", "-A", OUT_CHAIN, "-o", "lo", "-j", "RETURN",
    ]));
    s.push(step(&[
        "-t",
        "nat",
        "-A",
        OUT_CHAIN,
        "-d",
        "127.0.0.0/8",
        "-j",
        "RETURN",
    ]));
    for p in &a.skip_outbound_ports {
        s.push(step(&[
            "-t",
            "nat",
            "-A",
            OUT_CHAIN,
            "-p",
            "tcp",
            "--dport",
            &p.to_string(),
            "-j",
            "RETURN",
        ]));
    }
    for c in &a.skip_outbound_cidrs {
        s.push(step(&[
            "-t", "nat", "-A", OUT_CHAIN, "-d", c, "-j", "RETURN",
        ]));
    }
    s.push(step(&[
        "-t",
        "nat",
        "-A",
        OUT_CHAIN,
        "-p",
        "tcp",
        "-j",
        OUT_REDIRECT,
    ]));
    for (parent, chain) in [("PREROUTING", IN_CHAIN), ("OUTPUT", OUT_CHAIN)] {
        let jump: Vec<String> = ["-t", "nat", "-A", parent, "-p", "tcp", "-j", chain]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let mut check = jump.clone();
        check[2] = "-C".into();
        s.push(Step {
            args: jump,
            unless_present: Some(check),
            may_fail: false,
        });
    }
    Ok(s)
}

fn binary(mode: &str) -> &'static str {
    match mode {
        "nft" => "iptables-nft",
        "legacy" => "iptables-legacy",
        _ => "iptables",
    }
}

/// Applies the plan (or prints it with `dry_run`).
///
/// # Errors
/// The first failing command, with a clear message when permission is missing.
pub fn run(a: &InitArgs) -> Result<Vec<String>, InitError> {
    let bin = binary(&a.mode);
    let steps = plan(a)?;
    let mut done = Vec::new();
    for st in steps {
        let cmd = format!("{bin} {}", st.args.join(" "));
        if a.dry_run {
            done.push(cmd);
            continue;
        }
        if let Some(check) = &st.unless_present {
            let present = exec(bin, check)?;
            if present.0 {
                continue;
            }
        }
        let (ok, stderr) = exec(bin, &st.args)?;
        if !ok {
            if stderr.contains("Permission denied") || stderr.contains("Operation not permitted") {
                return Err(InitError::Permission {
                    bin: bin.into(),
                    cmd,
                });
            }
            if !st.may_fail {
                return Err(InitError::Failed { cmd, stderr });
            }
        }
        done.push(cmd);
    }
    Ok(done)
}

fn exec(bin: &str, args: &[String]) -> Result<(bool, String), InitError> {
    let out = Command::new(bin)
        .args(args)
        .output()
        .map_err(|source| InitError::Missing {
            bin: bin.into(),
            source,
        })?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).trim().to_owned(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> InitArgs {
        InitArgs {
            proxy_uid: 1337,
            inbound_port: 15006,
            outbound_port: 15001,
            admin_port: 15020,
            skip_inbound_ports: vec![22],
            skip_outbound_ports: vec![53],
            skip_outbound_cidrs: vec!["10.96.0.0/12".into()],
            mode: "auto".into(),
            dry_run: true,
        }
    }

    #[test]
    fn plans_our_chains_and_jumps() {
        let cmds = run(&args()).unwrap().join("\n");
        for want in [
            "iptables -t nat -N MEDMESH_INBOUND",
            "iptables -t nat -A MEDMESH_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006",
            "iptables -t nat -A MEDMESH_INBOUND -p tcp --dport 15020 -j RETURN",
            "iptables -t nat -A MEDMESH_INBOUND -p tcp --dport 22 -j RETURN",
            "iptables -t nat -A MEDMESH_OUTPUT -m owner --uid-owner 1337 -j RETURN",
            "iptables -t nat -A MEDMESH_OUTPUT -o lo -j RETURN",
            "iptables -t nat -A MEDMESH_OUTPUT -p tcp --dport 53 -j RETURN",
            "iptables -t nat -A MEDMESH_OUTPUT -d 10.96.0.0/12 -j RETURN",
            "iptables -t nat -A MEDMESH_OUT_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
            "iptables -t nat -A PREROUTING -p tcp -j MEDMESH_INBOUND",
            "iptables -t nat -A OUTPUT -p tcp -j MEDMESH_OUTPUT",
        ] {
            assert!(cmds.contains(want), "missing {want:?} in\n{cmds}");
        }
        // Skip rules come before the catch-all redirect.
        let skip = cmds.find("--dport 53 -j RETURN").unwrap();
        let catch = cmds
            .find("MEDMESH_OUTPUT -p tcp -j MEDMESH_OUT_REDIRECT")
            .unwrap();
        assert!(skip < catch);
    }

    #[test]
    fn refuses_bad_settings_all_at_once() {
        let mut a = args();
        a.skip_outbound_cidrs = vec!["10.0.0.0/99".into()];
        a.mode = "ebpf".into();
        a.admin_port = a.inbound_port;
        let Err(InitError::Invalid(errs)) = plan(&a) else {
            panic!("accepted")
        };
        assert_eq!(errs.len(), 3, "{errs:?}");
    }
}
