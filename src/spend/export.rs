//! `tollgate export`: the ledger rows of a period, every status, oldest first (by
//! `started_at`, then `trace_id`), as JSON lines or CSV — to archive them before
//! `storage.retention` deletes them.
//!
//! Rows are written one at a time as the ledger hands them over (SQLite: one statement
//! stepped row by row on a read-only connection; Postgres: a cursor read in batches of
//! [`crate::ledger::postgres::EXPORT_BATCH`]), so memory stays bounded whatever the period.
//!
//! Each line (JSON) or record (CSV) has the fields of a ledger row, named as in
//! `/admin/transactions`; CSV has a header line, `\r\n` line ends, RFC 4180 quoting, an
//! empty field for a missing value, and values exactly as stored (model names come from
//! clients: a spreadsheet may read one starting with `=` as a formula — archive tools
//! should read JSON lines or treat every CSV field as text).

use std::io::Write;
use std::path::Path;

use chrono::{DateTime, Utc};
use rusqlite::{Connection, OpenFlags};
use serde_json::Value;

use crate::ledger::Transaction;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Jsonl,
    Csv,
}

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("{0}")]
    Postgres(#[from] crate::pg::PgError),
    #[error("writing the export: {0}")]
    Io(#[from] std::io::Error),
}

/// The field names of a row, in order.
pub fn fields() -> Vec<String> {
    match serde_json::to_value(Transaction::default()) {
        Ok(Value::Object(m)) => m.keys().cloned().collect(),
        _ => Vec::new(),
    }
}

fn csv_field(v: &Value) -> String {
    let s = match v {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s
    }
}

/// Writes rows in one format.
pub struct Writer<W: Write> {
    out: W,
    format: Format,
    fields: Vec<String>,
}

impl<W: Write> Writer<W> {
    /// A writer; CSV starts with its header line.
    pub fn new(mut out: W, format: Format) -> std::io::Result<Writer<W>> {
        let fields = fields();
        if format == Format::Csv {
            out.write_all(fields.join(",").as_bytes())?;
            out.write_all(b"\r\n")?;
        }
        Ok(Writer {
            out,
            format,
            fields,
        })
    }

    pub fn row(&mut self, t: &Transaction) -> std::io::Result<()> {
        let v = serde_json::to_value(t).map_err(std::io::Error::other)?;
        match self.format {
            Format::Jsonl => {
                serde_json::to_writer(&mut self.out, &v).map_err(std::io::Error::other)?;
                self.out.write_all(b"\n")
            }
            Format::Csv => {
                let line: Vec<String> = self.fields.iter().map(|f| csv_field(&v[f])).collect();
                self.out.write_all(line.join(",").as_bytes())?;
                self.out.write_all(b"\r\n")
            }
        }
    }

    pub fn finish(mut self) -> std::io::Result<W> {
        self.out.flush()?;
        Ok(self.out)
    }
}

/// Export the embedded ledger's rows of `[since, until)` to `w`; answers the row count.
pub fn from_sqlite<W: Write>(
    path: &Path,
    since: DateTime<Utc>,
    until: DateTime<Utc>,
    w: &mut Writer<W>,
) -> Result<u64, ExportError> {
    let c = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    c.busy_timeout(std::time::Duration::from_secs(5))?;
    let mut st = c.prepare(&format!(
        "SELECT {} FROM billing_transactions WHERE started_at >= ?1 AND started_at < ?2
         ORDER BY started_at, trace_id",
        crate::ledger::sqlite::COLUMNS
    ))?;
    let mut rows = st.query([crate::time::to_text(since), crate::time::to_text(until)])?;
    let mut n = 0u64;
    while let Some(r) = rows.next()? {
        w.row(&crate::ledger::sqlite::row_to_tx(r)?)?;
        n += 1;
    }
    Ok(n)
}

/// Export the Postgres ledger's rows of `[since, until)` to `w`; answers the row count.
pub async fn from_pg<W: Write>(
    pg: &crate::ledger::postgres::PgLedger,
    since: DateTime<Utc>,
    until: DateTime<Utc>,
    w: &mut Writer<W>,
) -> Result<u64, ExportError> {
    Ok(pg
        .each_row(
            &crate::time::to_text(since),
            &crate::time::to_text(until),
            |t| w.row(&t),
        )
        .await?)
}
