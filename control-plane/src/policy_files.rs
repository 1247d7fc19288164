//! Policy from files: `--policy` names a YAML file or a directory of `*.yaml`/`*.yml`.
//!
//! Read at start (an invalid file stops the start, with the file, document, field and
//! reason), then polled every second. A changed set of files is applied as a whole: if any
//! document is invalid, the error is logged and nothing changes; otherwise the documents are
//! upserted and those that came from the files before but are gone from them are deleted.
//! Polling contents rather than using inotify needs no dependency and works the same on
//! every filesystem, including ConfigMap volumes that swap symlinks.

use crate::mesh::Mesh;
use crate::metrics as m;
use anyhow::Context;
use sinew_proto::policy::{Document, parse_documents};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// The files' contents, in order: also what tells whether anything changed.
pub type Contents = Vec<(PathBuf, String)>;

/// Reads the policy file, or every `*.yaml`/`*.yml` of the directory (sorted by name).
pub fn read(path: &Path) -> anyhow::Result<Contents> {
    let meta = std::fs::metadata(path)
        .with_context(|| format!("cannot read policy path {}", path.display()))?;
    let files = if meta.is_dir() {
        let mut files = Vec::new();
        for entry in std::fs::read_dir(path)
            .with_context(|| format!("cannot list policy directory {}", path.display()))?
        {
            let file = entry?.path();
            let yaml = file
                .extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| e == "yaml" || e == "yml");
            if yaml && file.is_file() {
                files.push(file);
            }
        }
        files.sort();
        files
    } else {
        vec![path.to_path_buf()]
    };
    files
        .into_iter()
        .map(|file| {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read policy file {}", file.display()))?;
            Ok((file, text))
        })
        .collect()
}

/// Parses and validates every file; the error names the file, document, field and reason.
pub fn parse(contents: &Contents) -> anyhow::Result<Vec<Document>> {
    let mut all: Vec<(Document, &Path)> = Vec::new();
    for (file, text) in contents {
        let docs = parse_documents(text).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
        for doc in docs {
            if let Some((_, other)) = all
                .iter()
                .find(|(d, _)| d.kind == doc.kind && d.name == doc.name)
            {
                anyhow::bail!(
                    "{}: {} `{}` is also defined in {}",
                    file.display(),
                    doc.kind,
                    doc.name,
                    other.display()
                );
            }
            all.push((doc, file));
        }
    }
    Ok(all.into_iter().map(|(d, _)| d).collect())
}

/// Polls the files and applies changes until `shutdown`.
pub async fn watch(
    path: PathBuf,
    mesh: Arc<Mesh>,
    mut last: Contents,
    interval: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        let read_path = path.clone();
        let contents = match tokio::task::spawn_blocking(move || read(&read_path)).await {
            Ok(Ok(contents)) => contents,
            Ok(Err(e)) => {
                tracing::error!("policy files not reloaded: {e:#}");
                continue;
            }
            Err(e) => {
                tracing::error!("policy files not reloaded: {e}");
                continue;
            }
        };
        if contents == last {
            continue;
        }
        match parse(&contents) {
            Err(e) => {
                m::policy_apply("invalid");
                tracing::error!("policy files changed but are invalid, nothing applied: {e:#}");
                last = contents;
            }
            Ok(docs) => match mesh.sync_files(docs) {
                Ok(changed) => {
                    m::policy_apply("ok");
                    tracing::info!(changed, version = mesh.version(), "policy files reloaded");
                    last = contents;
                }
                Err(e) => {
                    // `last` stays as it was, so the next tick tries again.
                    m::policy_apply("error");
                    tracing::error!("policy files not applied (will retry): {e}");
                }
            },
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_directory_and_names_the_file_in_errors() {
        let dir = std::env::temp_dir().join(format!(
            "sinew-pf-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("a.yaml"), "kind: Service\nname: a\n").unwrap();
        std::fs::write(dir.join("b.yml"), "kind: Service\nname: b\n").unwrap();
        std::fs::write(dir.join("notes.txt"), "not policy").unwrap();
        let contents = read(&dir).unwrap();
        assert_eq!(contents.len(), 2);
        assert_eq!(parse(&contents).unwrap().len(), 2);

        std::fs::write(dir.join("c.yaml"), "kind: Service\nname: a\n").unwrap();
        let err = parse(&read(&dir).unwrap()).unwrap_err().to_string();
        assert!(
            err.contains("c.yaml") && err.contains("also defined in"),
            "{err}"
        );

        std::fs::write(
            dir.join("c.yaml"),
            "kind: Service\nname: c\nspec: {timeout: 0ms}\n",
        )
        .unwrap();
        let err = parse(&read(&dir).unwrap()).unwrap_err().to_string();
        assert!(
            err.contains("c.yaml: document 1 (Service c): spec.timeout"),
            "{err}"
        );

        assert!(read(&dir.join("missing")).is_err());
        let _ = std::fs::remove_dir_all(dir);
    }
}
