//! `medmesh-operator`: `crds` prints the CustomResourceDefinitions; `run` serves the webhook,
//! the identity service and the admin endpoints.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use medmesh_operator::run::{self, Config, RawConfig};
use medmesh_operator::{crd, telemetry};

/// Exit status for unusable configuration.
const EXIT_CONFIG: u8 = 64;

#[derive(Parser)]
#[command(name = "medmesh-operator", version, about = "medmesh operator")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Print every CRD as multi-document YAML (the files in `crds/`).
    Crds {
        /// Write one file per CRD into this directory instead of printing.
        #[arg(long)]
        out_dir: Option<PathBuf>,
    },
    /// Serve the injection webhook, the identity service and the admin endpoints.
    Run(Box<RawConfig>),
}

fn main() -> ExitCode {
    match Cli::parse().cmd {
        Cmd::Crds { out_dir } => match crds(out_dir) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        },
        Cmd::Run(raw) => serve(*raw),
    }
}

fn serve(raw: RawConfig) -> ExitCode {
    // One crypto provider for the whole process (aws-lc-rs: post-quantum hybrid key exchange).
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    // Checked before logging starts: the OTLP layer depends on it, and problems go to stderr.
    let cfg = match Config::check(raw) {
        Ok(c) => c,
        Err(errs) => {
            eprintln!("invalid operator configuration ({} problems):", errs.len());
            for e in errs {
                eprintln!("  - {e}");
            }
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let otlp = cfg.otlp_endpoint.as_ref().map(|endpoint| telemetry::Otlp {
        endpoint: endpoint.clone(),
        namespace: cfg.namespace.clone(),
    });
    let telemetry = match telemetry::init(filter, otlp.as_ref()) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(o) = &otlp {
        tracing::info!(url = %o.traces_url(), "exporting traces over OTLP/HTTP");
    }
    // The configuration holds paths and names, no secrets, so it is logged whole.
    tracing::info!(config = ?cfg, "effective configuration");
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let status = match rt.block_on(run::run(cfg)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    };
    // The runtime goes first, so that spans of the drain are closed and queued; then the export
    // thread sends them (blocking, at most telemetry::FLUSH_TIMEOUT).
    drop(rt);
    if let Err(e) = telemetry.shutdown() {
        eprintln!("warning: traces not flushed: {e}");
    }
    status
}

fn crds(out_dir: Option<PathBuf>) -> anyhow::Result<()> {
    let Some(dir) = out_dir else {
        print!("{}", crd::yaml()?);
        return Ok(());
    };
    for c in crd::all() {
        let path = dir.join(crd::file_name(&c));
        std::fs::write(&path, crd::document(&c)?)
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}
