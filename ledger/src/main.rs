//! `medmesh-ledger`: run the audit ledger, or make its signing key.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use medmesh_core::NoteSigner;
use medmesh_ledger::{Config, Ledger};

/// mimalloc instead of glibc's allocator: the write path allocates and frees small buffers
/// from several threads per append (requests, records, redb pages), and glibc's arenas spent
/// about a tenth of the ledger's CPU there (bench/ledger's profile).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Exit status for unusable configuration (sysexits EX_USAGE/EX_CONFIG family).
const EXIT_CONFIG: u8 = 64;

#[derive(Parser)]
#[command(name = "medmesh-ledger", version, about = "medmesh audit ledger")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the ledger.
    Run {
        /// YAML configuration file.
        #[arg(long, env = "MEDMESH_LEDGER_CONFIG")]
        config: PathBuf,
        /// OTLP/HTTP base endpoint for traces (spans go to <endpoint>/v1/traces); none: no
        /// traces.
        #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
        otlp_endpoint: Option<String>,
    },
    /// Generate a checkpoint signing key; prints the verifier key.
    Keygen {
        /// Key name: the log origin.
        #[arg(long)]
        origin: String,
        /// Where to write the private key (mode 0600; refuses to overwrite).
        #[arg(long)]
        out: PathBuf,
    },
}

/// `service.name` of the ledger's spans.
const SERVICE_NAME: &str = "medmesh-ledger";

fn main() -> ExitCode {
    // One crypto provider for the whole process (aws-lc-rs: post-quantum hybrid key exchange).
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Keygen { origin, out } => match keygen(&origin, &out) {
            Ok(v) => {
                println!("{v}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        },
        Cmd::Run {
            config,
            otlp_endpoint,
        } => {
            let text = match std::fs::read_to_string(&config) {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("error: cannot read configuration {}: {e}", config.display());
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            let cfg = match Config::from_yaml(&text) {
                Ok(c) => Config {
                    source: Some(config.clone()),
                    ..c
                },
                Err(errs) => {
                    eprint!("{errs}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            if let Some(Err(e)) = otlp_endpoint
                .as_deref()
                .map(medmesh_telemetry::check_endpoint)
            {
                eprintln!("invalid ledger configuration: {e}");
                return ExitCode::from(EXIT_CONFIG);
            }
            let otlp = otlp_endpoint.map(|endpoint| medmesh_telemetry::Otlp {
                endpoint,
                attributes: vec![("service.instance.id", cfg.node_id.clone())],
            });
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
            tracing::info!(config = ?cfg, "effective configuration (paths only; no secrets are held in it)");
            let rt = match tokio::runtime::Runtime::new() {
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

async fn run(cfg: Config) -> ExitCode {
    let ledger = match Ledger::start(cfg).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    tokio::select! {
        _ = wait_for_signal() => {}
        why = ledger.failed() => {
            // Raft stopped under us (a storage failure, a bug): exit so that the orchestrator
            // restarts this replica from its durable state instead of serving a frozen one.
            tracing::error!(reason = %why, "replication stopped; exiting");
            return ExitCode::FAILURE;
        }
    }
    tracing::info!("shutting down: draining connections; a second signal exits at once");
    tokio::select! {
        _ = ledger.shutdown() => ExitCode::SUCCESS,
        _ = wait_for_signal() => {
            tracing::warn!("second signal: exiting without waiting for the drain");
            ExitCode::FAILURE
        }
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

fn keygen(origin: &str, out: &std::path::Path) -> anyhow::Result<String> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| anyhow::anyhow!("random: {e}"))?;
    let signer = NoteSigner::from_seed(origin, seed)?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(out)
        .map_err(|e| anyhow::anyhow!("{}: {e}", out.display()))?;
    writeln!(f, "{}", signer.private_key())?;
    f.sync_all()?;
    Ok(signer.verifier_key())
}
