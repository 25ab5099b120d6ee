//! `medmesh-operator`: `crds` prints the CustomResourceDefinitions; `run` serves the webhook,
//! the identity service and the admin endpoints.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use medmesh_operator::crd;

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
    }
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
