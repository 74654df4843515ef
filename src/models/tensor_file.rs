//! A safetensors file read by position: the header once at open, then each tensor with one
//! `pread` into its own buffer. No mapping, so the file's pages never count as this process's
//! memory: loading a checkpoint costs the model's size (plus one tensor in flight), not twice
//! that, and the OS page cache keeps what it likes.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

/// Where one tensor's bytes are.
#[derive(Clone, Debug)]
struct Entry {
    dtype: Option<DType>,
    stored: String,
    shape: Vec<usize>,
    start: u64,
    end: u64,
}

/// An open safetensors file.
#[derive(Debug)]
pub(crate) struct TensorFile {
    file: File,
    data_start: u64,
    entries: BTreeMap<String, Entry>,
    metadata: BTreeMap<String, String>,
}

fn dtype_of(s: &str) -> Option<DType> {
    Some(match s {
        "F16" => DType::F16,
        "BF16" => DType::BF16,
        "F32" => DType::F32,
        "F64" => DType::F64,
        "U8" => DType::U8,
        "U32" => DType::U32,
        "I64" => DType::I64,
        _ => return None,
    })
}

impl TensorFile {
    /// Opens `path` and reads its header; every tensor's range is checked against the file.
    pub(crate) fn open(path: &Path) -> Result<TensorFile, String> {
        let file = File::open(path).map_err(|e| e.to_string())?;
        let len = file.metadata().map_err(|e| e.to_string())?.len();
        let mut n = [0u8; 8];
        file.read_exact_at(&mut n, 0)
            .map_err(|_| "shorter than a safetensors header".to_string())?;
        let n = u64::from_le_bytes(n);
        if n > 100 << 20 || 8 + n > len {
            return Err(format!("header length {n} does not fit a {len}-byte file"));
        }
        let mut header = vec![0u8; n as usize];
        file.read_exact_at(&mut header, 8)
            .map_err(|e| e.to_string())?;
        let header: serde_json::Value =
            serde_json::from_slice(&header).map_err(|e| format!("header: {e}"))?;
        let map = header.as_object().ok_or("header is not a JSON object")?;
        let data_start = 8 + n;
        let mut entries = BTreeMap::new();
        let mut metadata = BTreeMap::new();
        for (name, v) in map {
            if name == "__metadata__" {
                // Writers put strings here (diffusers: `lora_adapter_metadata`, JSON in a string).
                if let Some(m) = v.as_object() {
                    metadata.extend(
                        m.iter()
                            .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string()))),
                    );
                }
                continue;
            }
            let bad = |what: &str| format!("tensor `{name}`: {what}");
            let stored = v["dtype"]
                .as_str()
                .ok_or_else(|| bad("no dtype"))?
                .to_string();
            let shape: Vec<usize> = v["shape"]
                .as_array()
                .ok_or_else(|| bad("no shape"))?
                .iter()
                .map(|d| d.as_u64().map(|d| d as usize))
                .collect::<Option<_>>()
                .ok_or_else(|| bad("bad shape"))?;
            let offsets = v["data_offsets"]
                .as_array()
                .ok_or_else(|| bad("no offsets"))?;
            let (start, end) = match offsets.as_slice() {
                [a, b] => (
                    a.as_u64().ok_or_else(|| bad("bad offset"))?,
                    b.as_u64().ok_or_else(|| bad("bad offset"))?,
                ),
                _ => return Err(bad("bad offsets")),
            };
            let dtype = dtype_of(&stored);
            let numel: u64 = shape.iter().map(|&d| d as u64).product();
            if let Some(dt) = dtype {
                if numel.checked_mul(dt.size_in_bytes() as u64) != Some(end.saturating_sub(start)) {
                    return Err(bad("byte range does not match its shape and dtype"));
                }
            }
            if start > end || data_start + end > len {
                return Err(bad("byte range beyond the file"));
            }
            entries.insert(
                name.clone(),
                Entry {
                    dtype,
                    stored,
                    shape,
                    start,
                    end,
                },
            );
        }
        Ok(TensorFile {
            file,
            data_start,
            entries,
            metadata,
        })
    }

    /// The header's `__metadata__` strings.
    pub(crate) fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    /// Every tensor name, sorted.
    pub(crate) fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    /// Every tensor name with its shape.
    pub(crate) fn shapes(&self) -> BTreeMap<String, Vec<usize>> {
        self.entries
            .iter()
            .map(|(k, e)| (k.clone(), e.shape.clone()))
            .collect()
    }

    /// One tensor, on the CPU, in its stored dtype.
    pub(crate) fn load(&self, name: &str) -> candle_core::Result<Tensor> {
        let e = self
            .entries
            .get(name)
            .ok_or_else(|| candle_core::Error::Msg(format!("no tensor `{name}`")))?;
        let Some(dtype) = e.dtype else {
            candle_core::bail!(
                "tensor `{name}` has dtype {}, which is not supported",
                e.stored
            );
        };
        let mut bytes = vec![0u8; (e.end - e.start) as usize];
        self.file
            .read_exact_at(&mut bytes, self.data_start + e.start)
            .map_err(|err| candle_core::Error::Msg(format!("reading `{name}`: {err}")))?;
        Tensor::from_raw_buffer(&bytes, dtype, &e.shape, &Device::Cpu)
    }
}
