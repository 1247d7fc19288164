//! The embedded store: one redb file, `<data-dir>/control.redb`.
//!
//! It keeps what must survive a restart: the applied policy documents (as the YAML
//! `sinewctl get` prints, parsed again with the same validation on load), the mesh CA, and a
//! floor for the config version, and the live instances: a restarted control plane keeps
//! serving them (their leases start again) until their sidecars reconnect, instead of
//! handing every reconnecting sidecar an empty endpoint set first.
//!
//! The version changes on every endpoint change, too often to write each one. The store
//! keeps a reservation instead: versions up to the stored floor may have been handed out,
//! so a restarted control plane starts from the floor and versions keep increasing.

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use std::path::Path;

/// `Service/<name>` -> the document's YAML.
const DOCUMENTS: TableDefinition<'_, &str, &str> = TableDefinition::new("documents");
/// `Service/<name>` -> 1 when the document came from the `--policy` files.
const FROM_FILES: TableDefinition<'_, &str, u8> = TableDefinition::new("documents_from_files");
/// `cert_pem`, `key_pem`.
const CA: TableDefinition<'_, &str, &str> = TableDefinition::new("ca");
/// `version_floor`.
const META: TableDefinition<'_, &str, u64> = TableDefinition::new("meta");
/// node id -> the instance's Hello (JSON of `InstanceSpec`).
const INSTANCES: TableDefinition<'_, &str, &str> = TableDefinition::new("instances");

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "cannot open the store {path}: {source} (is another sinew-control using the same --data-dir?)"
    )]
    Open {
        path: String,
        source: redb::DatabaseError,
    },
    #[error("cannot make the store {path} private (0600): {source}")]
    Private {
        path: String,
        source: std::io::Error,
    },
    #[error("store: {0}")]
    Redb(#[from] redb::Error),
}

/// Creates `path` empty with mode 0600 if it is missing (redb initialises an empty file),
/// else sets an existing file's mode to 0600.
fn private_file(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)?;
    file.set_permissions(std::fs::Permissions::from_mode(0o600))
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                StoreError::Redb(e.into())
            }
        }
    )*};
}
from_redb!(
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

/// A stored policy document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredDocument {
    pub key: String,
    pub yaml: String,
    pub from_file: bool,
}

pub struct Store {
    db: Database,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Store")
    }
}

impl Store {
    /// Opens (or creates) the store file and its tables. The file holds the CA's key, so it
    /// is made readable by its owner only (0600), whether new or left by an older version.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        private_file(path).map_err(|source| StoreError::Private {
            path: path.display().to_string(),
            source,
        })?;
        let db = Database::create(path).map_err(|source| StoreError::Open {
            path: path.display().to_string(),
            source,
        })?;
        let txn = db.begin_write()?;
        txn.open_table(DOCUMENTS)?;
        txn.open_table(FROM_FILES)?;
        txn.open_table(CA)?;
        txn.open_table(META)?;
        txn.open_table(INSTANCES)?;
        txn.commit()?;
        Ok(Store { db })
    }

    /// Every stored document, by key.
    pub fn documents(&self) -> Result<Vec<StoredDocument>, StoreError> {
        let txn = self.db.begin_read()?;
        let docs = txn.open_table(DOCUMENTS)?;
        let files = txn.open_table(FROM_FILES)?;
        let mut out = Vec::new();
        for row in docs.iter()? {
            let (k, v) = row?;
            let key = k.value().to_string();
            let from_file = files.get(key.as_str())?.is_some();
            out.push(StoredDocument {
                key,
                yaml: v.value().to_string(),
                from_file,
            });
        }
        Ok(out)
    }

    /// Writes and deletes documents in one transaction: all or nothing.
    pub fn write_documents(
        &self,
        upserts: &[StoredDocument],
        deletes: &[String],
    ) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        {
            let mut docs = txn.open_table(DOCUMENTS)?;
            let mut files = txn.open_table(FROM_FILES)?;
            for key in deletes {
                docs.remove(key.as_str())?;
                files.remove(key.as_str())?;
            }
            for doc in upserts {
                docs.insert(doc.key.as_str(), doc.yaml.as_str())?;
                if doc.from_file {
                    files.insert(doc.key.as_str(), 1u8)?;
                } else {
                    files.remove(doc.key.as_str())?;
                }
            }
        }
        txn.commit()?;
        Ok(())
    }

    /// The stored instances: (node id, JSON).
    pub fn instances(&self) -> Result<Vec<(String, String)>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(INSTANCES)?;
        let mut out = Vec::new();
        for row in table.iter()? {
            let (k, v) = row?;
            out.push((k.value().to_string(), v.value().to_string()));
        }
        Ok(out)
    }

    /// Stores (`Some(json)`) or forgets (`None`) instances, in one transaction.
    pub fn write_instances(&self, changes: &[(String, Option<String>)]) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        {
            let mut table = txn.open_table(INSTANCES)?;
            for (node_id, json) in changes {
                match json {
                    Some(json) => table.insert(node_id.as_str(), json.as_str())?,
                    None => table.remove(node_id.as_str())?,
                };
            }
        }
        txn.commit()?;
        Ok(())
    }

    /// The CA certificate and key, PEM, if one was created.
    pub fn ca(&self) -> Result<Option<(String, String)>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(CA)?;
        let cert = table.get("cert_pem")?.map(|v| v.value().to_string());
        let key = table.get("key_pem")?.map(|v| v.value().to_string());
        Ok(cert.zip(key))
    }

    pub fn put_ca(&self, cert_pem: &str, key_pem: &str) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        {
            let mut table = txn.open_table(CA)?;
            table.insert("cert_pem", cert_pem)?;
            table.insert("key_pem", key_pem)?;
        }
        txn.commit()?;
        Ok(())
    }

    /// No version above this was handed out before (0 for a new store).
    pub fn version_floor(&self) -> Result<u64, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(META)?;
        Ok(table.get("version_floor")?.map(|v| v.value()).unwrap_or(0))
    }

    pub fn set_version_floor(&self, floor: u64) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        {
            let mut table = txn.open_table(META)?;
            table.insert("version_floor", floor)?;
        }
        txn.commit()?;
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "sinew-store-{name}-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn documents_ca_and_version_survive_reopening() {
        let dir = temp_dir("reopen");
        let path = dir.join("control.redb");
        {
            let store = Store::open(&path).unwrap();
            assert!(store.documents().unwrap().is_empty());
            assert_eq!(store.ca().unwrap(), None);
            assert_eq!(store.version_floor().unwrap(), 0);
            let a = StoredDocument {
                key: "Service/a".into(),
                yaml: "kind: Service\nname: a\n".into(),
                from_file: true,
            };
            let b = StoredDocument {
                key: "Service/b".into(),
                yaml: "kind: Service\nname: b\n".into(),
                from_file: false,
            };
            store.write_documents(&[a, b], &[]).unwrap();
            store.write_documents(&[], &["Service/b".into()]).unwrap();
            store.put_ca("CERT", "KEY").unwrap();
            store.set_version_floor(1024).unwrap();
        }
        let store = Store::open(&path).unwrap();
        let docs = store.documents().unwrap();
        assert_eq!(docs.len(), 1);
        assert_eq!(
            (docs[0].key.as_str(), docs[0].from_file),
            ("Service/a", true)
        );
        assert_eq!(store.ca().unwrap(), Some(("CERT".into(), "KEY".into())));
        assert_eq!(store.version_floor().unwrap(), 1024);
        drop(store);
        let _ = std::fs::remove_dir_all(dir);
    }
}
