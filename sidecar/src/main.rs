//! `medmesh-sidecar`: `init` programs the pod's iptables; `run` is the proxy.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use medmesh_sidecar::config::{Config, RawConfig};
use medmesh_sidecar::{Sidecar, iptables};

/// Exit status for unusable configuration.
const EXIT_CONFIG: u8 = 64;

#[derive(Parser)]
#[command(
    name = "medmesh-sidecar",
    version,
    about = "medmesh transparent mTLS sidecar"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the proxy.
    Run(Box<RawConfig>),
    /// Redirect the pod's TCP traffic through the proxy (needs NET_ADMIN).
    Init(iptables::InitArgs),
}

fn main() -> ExitCode {
    // One crypto provider for the whole process (aws-lc-rs: post-quantum hybrid key exchange).
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().cmd {
        Cmd::Init(args) => match iptables::run(&args) {
            Ok(cmds) => {
                for c in cmds {
                    println!("{c}");
                }
                ExitCode::SUCCESS
            }
            Err(e @ iptables::InitError::Invalid(_)) => {
                eprintln!("error: {e}");
                ExitCode::from(EXIT_CONFIG)
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        },
        Cmd::Run(raw) => {
            let cfg = match Config::check(*raw) {
                Ok(c) => c,
                Err(errs) => {
                    eprintln!("invalid sidecar configuration ({} problems):", errs.len());
                    for e in errs {
                        eprintln!("  - {e}");
                    }
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            // No secrets live in the configuration (only paths), so it is logged whole.
            tracing::info!(config = ?cfg, "effective configuration");
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(sidecar_threads())
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("error: cannot start runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            rt.block_on(run(cfg))
        }
    }
}

/// A sidecar shares its pod's CPU: one worker by default (like linkerd2-proxy), more with
/// `MEDMESH_THREADS`.
fn sidecar_threads() -> usize {
    std::env::var("MEDMESH_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| (1..=64).contains(n))
        .unwrap_or(1)
}

async fn run(cfg: Config) -> ExitCode {
    let sidecar = match Sidecar::start(cfg).await {
        Ok(s) => s,
        Err(e @ medmesh_sidecar::StartError::Policy(_)) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    tokio::select! {
        _ = signal() => tracing::info!("signal received: draining; a second signal exits at once"),
        _ = sidecar.shutdown_requested() => tracing::info!("shutdown requested on the admin port: draining"),
    }
    tokio::select! {
        _ = sidecar.shutdown() => ExitCode::SUCCESS,
        _ = signal() => {
            tracing::warn!("second signal: exiting without finishing the drain");
            ExitCode::FAILURE
        }
    }
}

async fn signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut t), Ok(mut i)) => {
            tokio::select! {
                _ = t.recv() => {}
                _ = i.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
