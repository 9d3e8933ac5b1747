//! Parquet tables through arrow-rs: long-form columns of plain types, provenance in the metadata.

use std::collections::HashMap;
use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use arrow_array::{Array, ArrayRef, BooleanArray, Float64Array, Int64Array, RecordBatch, StringArray};
use arrow_schema::{DataType, Field, Schema};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;

use layerlab_pipeline::fsutil;

/// One column's values; `None` is a null.
#[derive(Debug, Clone, PartialEq)]
pub enum Column {
    Int(Vec<Option<i64>>),
    Float(Vec<Option<f64>>),
    Text(Vec<Option<String>>),
    Bool(Vec<Option<bool>>),
}

impl Column {
    fn len(&self) -> usize {
        match self {
            Column::Int(v) => v.len(),
            Column::Float(v) => v.len(),
            Column::Text(v) => v.len(),
            Column::Bool(v) => v.len(),
        }
    }
    fn data_type(&self) -> DataType {
        match self {
            Column::Int(_) => DataType::Int64,
            Column::Float(_) => DataType::Float64,
            Column::Text(_) => DataType::Utf8,
            Column::Bool(_) => DataType::Boolean,
        }
    }
    fn has_nulls(&self) -> bool {
        match self {
            Column::Int(v) => v.iter().any(Option::is_none),
            Column::Float(v) => v.iter().any(Option::is_none),
            Column::Text(v) => v.iter().any(Option::is_none),
            Column::Bool(v) => v.iter().any(Option::is_none),
        }
    }
    fn to_array(&self) -> ArrayRef {
        match self {
            Column::Int(v) => Arc::new(Int64Array::from(v.clone())),
            Column::Float(v) => Arc::new(Float64Array::from(v.clone())),
            Column::Text(v) => Arc::new(StringArray::from(v.clone())),
            Column::Bool(v) => Arc::new(BooleanArray::from(v.clone())),
        }
    }
}

/// A table being built column by column; `nullable` names columns that may hold nulls.
#[derive(Debug, Default)]
pub struct Table {
    pub columns: Vec<(String, Column, bool)>,
}

impl Table {
    pub fn new() -> Table {
        Table::default()
    }
    /// Adds a column that must not hold nulls.
    pub fn col(mut self, name: &str, c: Column) -> Table {
        self.columns.push((name.into(), c, false));
        self
    }
    /// Adds a nullable column.
    pub fn nullable(mut self, name: &str, c: Column) -> Table {
        self.columns.push((name.into(), c, true));
        self
    }

    fn batch(&self) -> Result<RecordBatch> {
        let mut fields = Vec::new();
        let mut arrays = Vec::new();
        let rows = self.columns.first().map(|(_, c, _)| c.len()).unwrap_or(0);
        for (name, c, nullable) in &self.columns {
            if c.len() != rows {
                bail!("column '{name}' has {} rows, expected {rows}", c.len());
            }
            if !nullable && c.has_nulls() {
                bail!("column '{name}' holds a null but is not nullable");
            }
            fields.push(Field::new(name, c.data_type(), *nullable));
            arrays.push(c.to_array());
        }
        Ok(RecordBatch::try_new(Arc::new(Schema::new(fields)), arrays)?)
    }

    /// Writes the table atomically as ZSTD Parquet with key-value metadata.
    pub fn write(&self, path: &Path, metadata: &[(String, String)]) -> Result<()> {
        let batch = self.batch().with_context(|| format!("cannot build table {}", path.display()))?;
        let kv = metadata.iter().map(|(k, v)| KeyValue::new(k.clone(), v.clone())).collect();
        let props = WriterProperties::builder()
            .set_compression(Compression::ZSTD(ZstdLevel::default()))
            .set_key_value_metadata(Some(kv))
            .build();
        fsutil::write_atomic_with(path, |file| {
            let mut writer = ArrowWriter::try_new(file, batch.schema(), Some(props))?;
            writer.write(&batch)?;
            writer.close()?;
            Ok(())
        })
    }
}

/// A table read back: its batches joined, and its key-value metadata.
#[derive(Debug)]
pub struct ReadTable {
    pub path: String,
    pub batch: RecordBatch,
    pub metadata: HashMap<String, String>,
}

impl ReadTable {
    pub fn read(path: &Path) -> Result<ReadTable> {
        let file = File::open(path).with_context(|| format!("cannot open table {}", path.display()))?;
        let builder = ParquetRecordBatchReaderBuilder::try_new(file)
            .with_context(|| format!("{} is not a Parquet file", path.display()))?;
        let metadata = builder
            .metadata()
            .file_metadata()
            .key_value_metadata()
            .map(|kv| kv.iter().filter_map(|k| Some((k.key.clone(), k.value.clone()?))).collect())
            .unwrap_or_default();
        let schema = builder.schema().clone();
        let reader = builder.build()?;
        let batches = reader
            .collect::<std::result::Result<Vec<_>, _>>()
            .with_context(|| format!("cannot read {}", path.display()))?;
        let batch = arrow_select::concat::concat_batches(&schema, &batches)?;
        Ok(ReadTable { path: path.display().to_string(), batch, metadata })
    }

    pub fn rows(&self) -> usize {
        self.batch.num_rows()
    }

    fn column(&self, name: &str, ty: DataType) -> Result<&ArrayRef> {
        let c = self.batch.column_by_name(name).with_context(|| format!("{}: no column '{name}'", self.path))?;
        if c.data_type() != &ty {
            bail!("{}: column '{name}' is {}, expected {ty}", self.path, c.data_type());
        }
        Ok(c)
    }

    pub fn ints(&self, name: &str) -> Result<Vec<Option<i64>>> {
        let c = self.column(name, DataType::Int64)?;
        let a = c.as_any().downcast_ref::<Int64Array>().context("Int64 column")?;
        Ok(a.iter().collect())
    }
    pub fn floats(&self, name: &str) -> Result<Vec<Option<f64>>> {
        let c = self.column(name, DataType::Float64)?;
        let a = c.as_any().downcast_ref::<Float64Array>().context("Float64 column")?;
        Ok(a.iter().collect())
    }
    pub fn texts(&self, name: &str) -> Result<Vec<Option<String>>> {
        let c = self.column(name, DataType::Utf8)?;
        let a = c.as_any().downcast_ref::<StringArray>().context("Utf8 column")?;
        Ok(a.iter().map(|s| s.map(str::to_string)).collect())
    }
    pub fn bools(&self, name: &str) -> Result<Vec<Option<bool>>> {
        let c = self.column(name, DataType::Boolean)?;
        let a = c.as_any().downcast_ref::<BooleanArray>().context("Boolean column")?;
        Ok(a.iter().collect())
    }
}

/// Provenance written into every table: layerlab version, experiment, config and its hash.
pub fn provenance(experiment: &str, config_json: &str, config_hash: &str) -> Vec<(String, String)> {
    vec![
        ("layerlab_version".into(), layerlab_pipeline::VERSION.into()),
        ("experiment".into(), experiment.into()),
        ("config".into(), config_json.into()),
        ("config_hash".into(), config_hash.into()),
    ]
}

/// Provenance with the device the table was computed on (see [`crate::device`]).
pub fn with_device(mut meta: Vec<(String, String)>, device: &str) -> Vec<(String, String)> {
    meta.push(("device".into(), device.into()));
    meta
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_round_trips_with_nulls_and_metadata() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.parquet");
        Table::new()
            .col("unit", Column::Text(vec![Some("fc1".into()), Some("fc2".into())]))
            .nullable("epoch", Column::Int(vec![Some(0), None]))
            .col("err", Column::Float(vec![Some(0.5), Some(0.25)]))
            .write(&path, &[("k".into(), "v".into())])
            .unwrap();
        let t = ReadTable::read(&path).unwrap();
        assert_eq!(t.rows(), 2);
        assert_eq!(t.ints("epoch").unwrap(), vec![Some(0), None]);
        assert_eq!(t.floats("err").unwrap(), vec![Some(0.5), Some(0.25)]);
        assert_eq!(t.metadata.get("k").map(String::as_str), Some("v"));
        assert!(format!("{:#}", t.floats("unit").unwrap_err()).contains("expected Float64"));
        assert!(format!("{:#}", t.ints("nope").unwrap_err()).contains("no column 'nope'"));
    }

    #[test]
    fn a_null_in_a_plain_column_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let r = Table::new().col("x", Column::Int(vec![None])).write(&dir.path().join("t.parquet"), &[]);
        assert!(r.is_err());
        assert!(!dir.path().join("t.parquet").exists());
    }
}
