//! Safetensors I/O under Hugging Face parameter names: single files and
//! sharded indexes in, one `model.safetensors` out (with the `format: pt`
//! metadata transformers expects). Pickled `.bin` / `.pt` files are refused:
//! loading them would execute arbitrary code.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::Context;
use safetensors::tensor::{Dtype, SafeTensors, View};
use tch::{Device, Kind, Tensor};

/// Every tensor of a checkpoint folder, by name, on `device` (in the stored kind).
pub fn read_folder(dir: &Path, device: Device) -> anyhow::Result<BTreeMap<String, Tensor>> {
    let files = weight_files(dir)?;
    let mut out = BTreeMap::new();
    for file in files {
        for (name, t) in read_file(&file, device)? {
            out.insert(name, t);
        }
    }
    Ok(out)
}

/// A checkpoint folder's tensors, memory-mapped and read one at a time:
/// loading a model into its variables then holds the variables and one
/// tensor, never a second copy of the whole checkpoint.
pub struct MappedFolder {
    maps: Vec<memmap2::Mmap>,
    entries: BTreeMap<String, Entry>,
}

/// Where one tensor's bytes are.
struct Entry {
    map: usize,
    start: usize,
    len: usize,
    kind: Kind,
    shape: Vec<i64>,
}

impl MappedFolder {
    /// Maps every safetensors file of `dir` (see [`weight_files`]).
    pub fn open(dir: &Path) -> anyhow::Result<MappedFolder> {
        let mut maps = Vec::new();
        let mut entries = BTreeMap::new();
        for path in weight_files(dir)? {
            let file = std::fs::File::open(&path)
                .with_context(|| format!("opening {}", path.display()))?;
            // Safety: read-only; checkpoints in the cache are immutable, and
            // every tensor made from the map is a copy.
            let map = unsafe { memmap2::Mmap::map(&file) }
                .with_context(|| format!("mapping {}", path.display()))?;
            let st = SafeTensors::deserialize(&map)
                .with_context(|| format!("{}: not a safetensors file", path.display()))?;
            for (name, view) in st.tensors() {
                let data = view.data();
                entries.insert(
                    name,
                    Entry {
                        map: maps.len(),
                        start: data.as_ptr() as usize - map.as_ptr() as usize,
                        len: data.len(),
                        kind: kind_of(view.dtype())?,
                        shape: view.shape().iter().map(|&d| d as i64).collect(),
                    },
                );
            }
            maps.push(map);
        }
        Ok(MappedFolder { maps, entries })
    }

    /// The shape of tensor `name`, if the checkpoint has it.
    pub fn shape(&self, name: &str) -> Option<&[i64]> {
        self.entries.get(name).map(|e| e.shape.as_slice())
    }

    /// Tensor `name` read into memory (in its stored kind, on the CPU).
    pub fn tensor(&self, name: &str) -> anyhow::Result<Tensor> {
        let e = self
            .entries
            .get(name)
            .with_context(|| format!("no tensor `{name}`"))?;
        let bytes = &self.maps[e.map][e.start..e.start + e.len];
        Ok(Tensor::f_from_data_size(bytes, &e.shape, e.kind)?)
    }

    /// The kind of the first floating tensor by name (float32 when none):
    /// the dtype the checkpoint was saved in.
    pub fn float_kind(&self) -> Kind {
        self.entries
            .values()
            .map(|e| e.kind)
            .find(|k| matches!(k, Kind::Half | Kind::BFloat16 | Kind::Float | Kind::Double))
            .unwrap_or(Kind::Float)
    }
}

/// The safetensors files of a folder: `model.safetensors`, or the shards a
/// `model.safetensors.index.json` lists.
pub fn weight_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let text = std::fs::read_to_string(&index)
            .with_context(|| format!("reading {}", index.display()))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", index.display()))?;
        let map = v["weight_map"]
            .as_object()
            .with_context(|| format!("{}: no weight_map", index.display()))?;
        let mut shards: Vec<String> = map
            .values()
            .filter_map(|s| s.as_str().map(str::to_string))
            .collect();
        shards.sort();
        shards.dedup();
        return Ok(shards.into_iter().map(|s| dir.join(s)).collect());
    }
    for pickled in [
        "pytorch_model.bin",
        "model.pt",
        "model.bin",
        "pytorch_model.bin.index.json",
    ] {
        if dir.join(pickled).exists() {
            anyhow::bail!(
                "{}: `{pickled}` is a pickled checkpoint, which alignflow never loads (it can run arbitrary code); \
                 convert it to safetensors (transformers: `model.save_pretrained(dir, safe_serialization=True)`)",
                dir.display()
            );
        }
    }
    anyhow::bail!(
        "{}: no model.safetensors or model.safetensors.index.json",
        dir.display()
    )
}

/// The `torch_dtype` a `config.json` names for weights of `kind`.
pub fn dtype_name(kind: Kind) -> &'static str {
    match kind {
        Kind::BFloat16 => "bfloat16",
        Kind::Half => "float16",
        Kind::Double => "float64",
        _ => "float32",
    }
}

fn kind_of(dtype: Dtype) -> anyhow::Result<Kind> {
    Ok(match dtype {
        Dtype::BOOL => Kind::Bool,
        Dtype::U8 => Kind::Uint8,
        Dtype::I8 => Kind::Int8,
        Dtype::I16 => Kind::Int16,
        Dtype::I32 => Kind::Int,
        Dtype::I64 => Kind::Int64,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::F16 => Kind::Half,
        Dtype::F32 => Kind::Float,
        Dtype::F64 => Kind::Double,
        other => anyhow::bail!("unsupported dtype {other:?}"),
    })
}

fn dtype_of(kind: Kind) -> anyhow::Result<Dtype> {
    Ok(match kind {
        Kind::Bool => Dtype::BOOL,
        Kind::Uint8 => Dtype::U8,
        Kind::Int8 => Dtype::I8,
        Kind::Int16 => Dtype::I16,
        Kind::Int => Dtype::I32,
        Kind::Int64 => Dtype::I64,
        Kind::BFloat16 => Dtype::BF16,
        Kind::Half => Dtype::F16,
        Kind::Float => Dtype::F32,
        Kind::Double => Dtype::F64,
        other => anyhow::bail!("unsupported kind {other:?}"),
    })
}

/// Reads one safetensors file (memory-mapped).
pub fn read_file(path: &Path, device: Device) -> anyhow::Result<Vec<(String, Tensor)>> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    // Safety: the map is read-only and dropped before we return; checkpoints
    // in the cache are immutable.
    let map = unsafe { memmap2::Mmap::map(&file) }
        .with_context(|| format!("mapping {}", path.display()))?;
    let st = SafeTensors::deserialize(&map)
        .with_context(|| format!("{}: not a safetensors file", path.display()))?;
    let mut out = Vec::new();
    for (name, view) in st.tensors() {
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        let t = Tensor::f_from_data_size(view.data(), &shape, kind_of(view.dtype())?)?
            .to_device(device);
        out.push((name, t));
    }
    Ok(out)
}

/// A tensor's bytes for writing: read in place when it is already a
/// contiguous CPU tensor of the written kind, otherwise converted when the
/// writer reaches it (one tensor at a time, never a copy of the model).
struct Bytes<'a> {
    dtype: Dtype,
    kind: Kind,
    shape: Vec<usize>,
    tensor: Tensor,
    /// The same values as stored in a checkpoint (name there), read in
    /// place of `tensor` when it is held in a narrower kind than `kind`.
    stored: Option<(&'a MappedFolder, &'a str)>,
    len: usize,
}

impl Bytes<'_> {
    /// Whether `tensor`'s own storage holds the bytes to write.
    fn in_place(&self) -> bool {
        self.tensor.device() == Device::Cpu
            && self.tensor.kind() == self.kind
            && self.tensor.is_contiguous()
    }
}

impl View for &Bytes<'_> {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        if self.len == 0 {
            return Cow::Borrowed(&[]);
        }
        if let Some((folder, name)) = self.stored {
            let e = &folder.entries[name];
            if e.kind == self.kind {
                return Cow::Borrowed(&folder.maps[e.map][e.start..e.start + e.len]);
            }
            let t = folder
                .tensor(name)
                .expect("checked when chosen")
                .to_kind(self.kind)
                .contiguous();
            // SAFETY: `t` is contiguous on the CPU, alive until its bytes
            // are copied.
            let bytes = unsafe { std::slice::from_raw_parts(t.data_ptr() as *const u8, self.len) };
            return Cow::Owned(bytes.to_vec());
        }
        if self.in_place() {
            // SAFETY: `tensor` is contiguous on the CPU and lives as long as
            // `self`; its `len` bytes start at its data pointer.
            return Cow::Borrowed(unsafe {
                std::slice::from_raw_parts(self.tensor.data_ptr() as *const u8, self.len)
            });
        }
        let t = self
            .tensor
            .to_device(Device::Cpu)
            .to_kind(self.kind)
            .contiguous();
        // SAFETY: as above, for the converted copy, alive until the copy
        // of its bytes is made.
        let bytes = unsafe { std::slice::from_raw_parts(t.data_ptr() as *const u8, self.len) };
        Cow::Owned(bytes.to_vec())
    }
    fn data_len(&self) -> usize {
        self.len
    }
}

/// Writes `tensors` to `path` as safetensors with `{"format": "pt"}` metadata.
pub fn write_file(path: &Path, tensors: &BTreeMap<String, Tensor>) -> anyhow::Result<()> {
    write_file_as(path, tensors, None)
}

/// [`write_file`], every floating tensor written as `kind` when given
/// (converted one at a time as the file is written).
pub fn write_file_as(
    path: &Path,
    tensors: &BTreeMap<String, Tensor>,
    kind: Option<Kind>,
) -> anyhow::Result<()> {
    write_file_exact(path, tensors, kind, None)
}

/// [`write_file_as`], with the tensors named in `exact` (name -> its name
/// in `folder`) written from `folder`'s stored values, one at a time as
/// the file is written: what a model holds in a narrower kind than the
/// file's (frozen bf16 weights of a float32 checkpoint) is saved as it was
/// loaded, not rounded.
pub fn write_file_exact(
    path: &Path,
    tensors: &BTreeMap<String, Tensor>,
    kind: Option<Kind>,
    exact: Option<(&MappedFolder, &BTreeMap<String, String>)>,
) -> anyhow::Result<()> {
    let mut owned = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let kind = match kind {
            Some(k) if t.is_floating_point() => k,
            _ => t.kind(),
        };
        let len = t.numel() * kind.elt_size_in_bytes();
        let stored = exact.and_then(|(folder, names)| {
            let stored_name = names.get(name)?;
            let e = folder.entries.get(stored_name)?;
            (e.shape == t.size()).then_some((folder, stored_name.as_str()))
        });
        owned.push((
            name.clone(),
            Bytes {
                dtype: dtype_of(kind)?,
                kind,
                shape: t.size().iter().map(|&d| d as usize).collect(),
                tensor: t.detach(),
                stored,
                len,
            },
        ));
    }
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(
        owned.iter().map(|(n, b)| (n.as_str(), b)),
        Some(metadata),
        path,
    )
    .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}
