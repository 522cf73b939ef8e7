//! Snapshot metadata in redb, an embedded ACID store: every change is one
//! transaction, durable when `commit` returns, so a crash leaves either the
//! old or the new state and never a half-made snapshot.
//!
//! Tables: `snapshots` maps a key (active/view) or name (committed) to its
//! JSON [`Record`]; `children` maps a parent to the keys built on it, so
//! Remove can refuse a snapshot that still has children without a scan;
//! `meta` holds the id sequence and the schema version.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use redb::{
    Database, MultimapTableDefinition, ReadTransaction, ReadableDatabase, ReadableMultimapTable,
    ReadableTable, TableDefinition, WriteTransaction,
};
use serde::{Deserialize, Serialize};

const SNAPSHOTS: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshots");
const CHILDREN: MultimapTableDefinition<&str, &str> = MultimapTableDefinition::new("children");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const NEXT_ID: &str = "next_id";
const SCHEMA: &str = "schema";
const SCHEMA_VERSION: u64 = 1;

/// Errors of the metadata store.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The database file could not be opened or created.
    #[error("open metadata store {path}")]
    Open {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: Box<redb::DatabaseError>,
    },
    /// Another process has the store open.
    #[error(
        "metadata store {path} is in use by another hyperbox-snapshotter (one root, one daemon)"
    )]
    InUse {
        /// The file.
        path: PathBuf,
    },
    /// The store was written by a newer schema.
    #[error("metadata store {path} has schema {found}, this build reads {SCHEMA_VERSION}")]
    Schema {
        /// The file.
        path: PathBuf,
        /// Its schema.
        found: u64,
    },
    /// A transaction failed.
    #[error("metadata store: {action}")]
    Db {
        /// What was being done.
        action: &'static str,
        /// The cause.
        #[source]
        source: Box<redb::Error>,
    },
    /// A record could not be decoded (corruption or a foreign writer).
    #[error("metadata store: record {key} is unreadable")]
    Corrupt {
        /// Its key.
        key: String,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
}

type Result<T> = std::result::Result<T, Error>;

fn db<E: Into<redb::Error>>(action: &'static str) -> impl FnOnce(E) -> Error {
    move |e| Error::Db {
        action,
        source: Box::new(e.into()),
    }
}

/// What a snapshot is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Read-only view of a parent.
    View,
    /// Writable, not yet committed.
    Active,
    /// Sealed; can be a parent.
    Committed,
}

impl Kind {
    /// containerd's name for it, as used in filters.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::View => "view",
            Kind::Active => "active",
            Kind::Committed => "committed",
        }
    }
}

/// Disk usage of a snapshot's own layer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Bytes allocated.
    pub size: i64,
    /// Inodes used.
    pub inodes: i64,
}

/// One snapshot's metadata.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Directory id: the snapshot lives in `snapshots/<id>`.
    pub id: u64,
    /// Kind.
    pub kind: Kind,
    /// Parent's name, if any.
    pub parent: Option<String>,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Creation time, nanoseconds since the epoch.
    pub created: i128,
    /// Last update, nanoseconds since the epoch.
    pub updated: i128,
    /// Usage, recorded at commit.
    pub usage: Option<Usage>,
    /// For a layer fetched by the remote path: its digest. The directory
    /// then holds `layer.erofs` (a hard link to the converted image), mounted
    /// read-only at `fs`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer: Option<String>,
}

/// The metadata database.
#[derive(Debug)]
pub struct Store {
    db: Database,
}

impl Store {
    /// Opens (or creates) the store at `path`.
    pub fn open(path: &Path) -> Result<Store> {
        let database = Database::create(path).map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => Error::InUse { path: path.into() },
            e => Error::Open {
                path: path.into(),
                source: Box::new(e),
            },
        })?;
        let store = Store { db: database };
        let tx = store.write()?;
        {
            let mut meta = tx.open_table(META).map_err(db("open meta table"))?;
            let found = meta
                .get(SCHEMA)
                .map_err(db("read schema"))?
                .map(|v| v.value());
            match found {
                None => {
                    meta.insert(SCHEMA, SCHEMA_VERSION)
                        .map_err(db("write schema"))?;
                }
                Some(v) if v == SCHEMA_VERSION => {}
                Some(found) => {
                    return Err(Error::Schema {
                        path: path.into(),
                        found,
                    });
                }
            }
            tx.open_table(SNAPSHOTS)
                .map_err(db("open snapshots table"))?;
            tx.open_multimap_table(CHILDREN)
                .map_err(db("open children table"))?;
        }
        tx.commit().map_err(db("commit schema"))?;
        Ok(store)
    }

    /// Starts a write transaction (one at a time; others wait).
    pub fn write(&self) -> Result<WriteTransaction> {
        self.db.begin_write().map_err(db("begin write"))
    }

    /// Starts a read transaction (a consistent snapshot of the store).
    pub fn read(&self) -> Result<ReadTransaction> {
        self.db.begin_read().map_err(db("begin read"))
    }
}

fn decode(key: &str, bytes: &[u8]) -> Result<Record> {
    serde_json::from_slice(bytes).map_err(|source| Error::Corrupt {
        key: key.into(),
        source,
    })
}

/// Reads inside a transaction of either kind.
pub trait Reader {
    /// The record of `key`.
    fn get(&self, key: &str) -> Result<Option<Record>>;
    /// Every record, in key order.
    fn all(&self) -> Result<Vec<(String, Record)>>;
    /// Whether `key` has children.
    fn has_children(&self, key: &str) -> Result<bool>;
}

fn get_in(
    t: &impl ReadableTable<&'static str, &'static [u8]>,
    key: &str,
) -> Result<Option<Record>> {
    let v = t.get(key).map_err(db("get snapshot"))?;
    v.map(|v| decode(key, v.value())).transpose()
}

fn all_in(t: &impl ReadableTable<&'static str, &'static [u8]>) -> Result<Vec<(String, Record)>> {
    let mut out = Vec::new();
    for item in t.iter().map_err(db("iterate snapshots"))? {
        let (k, v) = item.map_err(db("read snapshot"))?;
        out.push((k.value().to_string(), decode(k.value(), v.value())?));
    }
    Ok(out)
}

fn has_children_in(
    t: &impl ReadableMultimapTable<&'static str, &'static str>,
    key: &str,
) -> Result<bool> {
    let mut it = t.get(key).map_err(db("get children"))?;
    Ok(it.next().is_some())
}

/// Both transaction kinds read alike; only the table handle types differ.
macro_rules! impl_reader {
    ($tx:ty) => {
        impl Reader for $tx {
            fn get(&self, key: &str) -> Result<Option<Record>> {
                get_in(
                    &self.open_table(SNAPSHOTS).map_err(db("open snapshots"))?,
                    key,
                )
            }

            fn all(&self) -> Result<Vec<(String, Record)>> {
                all_in(&self.open_table(SNAPSHOTS).map_err(db("open snapshots"))?)
            }

            fn has_children(&self, key: &str) -> Result<bool> {
                has_children_in(
                    &self
                        .open_multimap_table(CHILDREN)
                        .map_err(db("open children"))?,
                    key,
                )
            }
        }
    };
}

impl_reader!(ReadTransaction);
impl_reader!(WriteTransaction);

/// Writes inside a write transaction.
pub trait Writer {
    /// Allocates the next directory id.
    fn next_id(&self) -> Result<u64>;
    /// Inserts or replaces `key`'s record.
    fn put(&self, key: &str, r: &Record) -> Result<()>;
    /// Deletes `key`'s record.
    fn delete(&self, key: &str) -> Result<()>;
    /// Records `child` as built on `parent`.
    fn link(&self, parent: &str, child: &str) -> Result<()>;
    /// Forgets that `child` is built on `parent`.
    fn unlink(&self, parent: &str, child: &str) -> Result<()>;
}

impl Writer for WriteTransaction {
    fn next_id(&self) -> Result<u64> {
        let mut meta = self.open_table(META).map_err(db("open meta"))?;
        let id = meta
            .get(NEXT_ID)
            .map_err(db("read id"))?
            .map(|v| v.value())
            .unwrap_or(1);
        meta.insert(NEXT_ID, id + 1).map_err(db("write id"))?;
        Ok(id)
    }

    fn put(&self, key: &str, r: &Record) -> Result<()> {
        let bytes = serde_json::to_vec(r).expect("records serialize");
        let mut t = self.open_table(SNAPSHOTS).map_err(db("open snapshots"))?;
        t.insert(key, bytes.as_slice())
            .map_err(db("put snapshot"))?;
        Ok(())
    }

    fn delete(&self, key: &str) -> Result<()> {
        let mut t = self.open_table(SNAPSHOTS).map_err(db("open snapshots"))?;
        t.remove(key).map_err(db("delete snapshot"))?;
        Ok(())
    }

    fn link(&self, parent: &str, child: &str) -> Result<()> {
        let mut t = self
            .open_multimap_table(CHILDREN)
            .map_err(db("open children"))?;
        t.insert(parent, child).map_err(db("link child"))?;
        Ok(())
    }

    fn unlink(&self, parent: &str, child: &str) -> Result<()> {
        let mut t = self
            .open_multimap_table(CHILDREN)
            .map_err(db("open children"))?;
        t.remove(parent, child).map_err(db("unlink child"))?;
        Ok(())
    }
}
