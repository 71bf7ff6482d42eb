//! Writes the MtprotoGateway CRD generated from the Rust types into `crds/`.
//!
//! Usage: `crdgen [REPO_ROOT]` (default: the current directory), or `crdgen -` for stdout.

use std::path::PathBuf;

use anyhow::Context;
use mtproto_operator::crd::{crd_yaml, CRD_FILE};

fn main() -> anyhow::Result<()> {
    let yaml = crd_yaml().context("serialising the CRD")?;
    match std::env::args().nth(1).as_deref() {
        Some("-") => print!("{yaml}"),
        root => {
            let path = PathBuf::from(root.unwrap_or(".")).join(CRD_FILE);
            std::fs::write(&path, yaml).with_context(|| format!("writing {}", path.display()))?;
            eprintln!("wrote {}", path.display());
        }
    }
    Ok(())
}
