//! `medmesh-sidecar`: `init` programs the pod's iptables; `run` is the proxy.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use medmesh_sidecar::config::{Config, RawConfig};
use medmesh_sidecar::{Sidecar, iptables};

/// Exit status for unusable configuration.
const EXIT_CONFIG: u8 = 64;
/// `service.name` of the sidecar's spans.
const SERVICE_NAME: &str = "medmesh-sidecar";

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
    match Cli::parse().cmd {
        Cmd::Init(args) => match logs_only().map(|_| iptables::run(&args)) {
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
            Ok(r) => match r {
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
            let otlp = cfg.otlp_endpoint.clone().map(medmesh_telemetry::Otlp::new);
            let telemetry = match medmesh_telemetry::start(
                SERVICE_NAME,
                env!("CARGO_PKG_VERSION"),
                otlp.as_ref(),
            ) {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::FAILURE;
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
            let status = rt.block_on(run(cfg));
            // The runtime goes first so that the drain's spans are closed; then they are sent.
            drop(rt);
            if let Err(e) = telemetry.shutdown() {
                eprintln!("warning: traces not flushed: {e}");
            }
            status
        }
    }
}

/// Logs on stderr, no traces (`init`).
fn logs_only() -> Result<(), medmesh_telemetry::TelemetryError> {
    medmesh_telemetry::start(SERVICE_NAME, env!("CARGO_PKG_VERSION"), None).map(|_| ())
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
