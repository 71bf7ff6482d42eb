//! Writes the MtprotoGateway CRD generated from the Rust types into `crds/` and the Helm
//! chart's `files/` (its `templates/crd.yaml` renders it).
//!
//! Usage: `crdgen [REPO_ROOT]` (default: the current directory), or `crdgen -` for stdout.

use std::path::PathBuf;

use anyhow::Context;
use mtproto_operator::crd::{crd_yaml, CRD_FILES};

fn main() -> anyhow::Result<()> {
    let yaml = crd_yaml().context("serialising the CRD")?;
    match std::env::args().nth(1).as_deref() {
        Some("-") => print!("{yaml}"),
        root => {
            let root = PathBuf::from(root.unwrap_or("."));
            for file in CRD_FILES {
                let path = root.join(file);
                std::fs::write(&path, &yaml)
                    .with_context(|| format!("writing {}", path.display()))?;
                eprintln!("wrote {}", path.display());
            }
        }
    }
    Ok(())
}
