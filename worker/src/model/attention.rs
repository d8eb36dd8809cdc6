//! Attention plumbing shared by the families: the key/value cache, the
//! combined causal + padding mask, and libtorch's fused attention kernel.

use tch::{Kind, Tensor};

/// Keys and values of past positions, per layer.
///
/// With a capacity, each layer's buffers are allocated once and written in
/// place, so a decoding step costs no copy of the whole past (the naive
/// concatenation makes generation quadratic in memory traffic).
///
/// In slot mode ([`KvCache::slots`]) each row is a sequence of its own that
/// joined the batch at its own time: a decoding step writes each row's one
/// new position at that row's column ([`KvCache::set_columns`]), and the
/// attention mask hides the columns past it.
///
/// # Shapes
/// Each layer: `[batch, kv_heads, len, head_dim]`.
#[derive(Debug, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    len: i64,
    capacity: Option<i64>,
    /// Slot mode: `[batch, 1, 1, 1]` int64, the column each row writes next.
    columns: Option<Tensor>,
    /// Slot mode: rows of the buffers.
    slot_rows: i64,
}

impl KvCache {
    /// A cache that grows by concatenation.
    pub fn new(num_layers: i64) -> KvCache {
        KvCache {
            layers: (0..num_layers).map(|_| None).collect(),
            len: 0,
            capacity: None,
            columns: None,
            slot_rows: 0,
        }
    }

    /// A slot-mode cache: `rows` sequences of up to `capacity` positions
    /// each; the buffers are allocated on the first write.
    pub fn slots(num_layers: i64, rows: i64, capacity: i64) -> KvCache {
        KvCache {
            capacity: Some(capacity),
            slot_rows: rows,
            ..KvCache::new(num_layers)
        }
    }

    /// Keys and values of layer `layer` as they are held (in slot mode the
    /// whole buffers; otherwise the cached positions).
    pub fn buffers(&self, layer: usize) -> Option<(&Tensor, &Tensor)> {
        self.layers[layer].as_ref().map(|(k, v)| (k, v))
    }

    /// Slot mode: writes a prompt's keys and values `k`, `v`
    /// (`[kv_heads, len, head_dim]`) into the first `len` columns of row
    /// `slot`, whatever that row held before.
    pub fn write_slot(&mut self, layer: usize, slot: i64, k: &Tensor, v: &Tensor) {
        let len = k.size()[1];
        let (kb, vb) = self.slot_buffers(layer, k);
        kb.get(slot).narrow(1, 0, len).copy_(k);
        vb.get(slot).narrow(1, 0, len).copy_(v);
    }

    /// Slot mode: layer `layer`'s buffers, allocated like `k` (`[.., kv_heads,
    /// len, head_dim]`) when missing.
    fn slot_buffers(&mut self, layer: usize, k: &Tensor) -> &mut (Tensor, Tensor) {
        let (rows, capacity) = (self.slot_rows, self.capacity.expect("slot mode"));
        self.layers[layer].get_or_insert_with(|| {
            let dims = k.size();
            let shape = [rows, dims[dims.len() - 3], capacity, dims[dims.len() - 1]];
            let zeros = || Tensor::zeros(shape, (k.kind(), k.device()));
            (zeros(), zeros())
        })
    }

    /// Slot mode: the next step writes row `i` at column `columns[i]` and
    /// attends over the first `max(columns) + 1` columns.
    pub fn set_columns(&mut self, columns: &[i64], device: tch::Device) {
        let rows = columns.len() as i64;
        self.len = columns.iter().max().map_or(0, |c| c + 1);
        self.columns = Some(
            Tensor::from_slice(columns)
                .to_device(device)
                .view([rows, 1, 1, 1]),
        );
    }

    /// A cache with room for `capacity` positions, allocated on first use.
    pub fn with_capacity(num_layers: i64, capacity: i64) -> KvCache {
        KvCache {
            capacity: Some(capacity),
            ..KvCache::new(num_layers)
        }
    }

    /// Slot mode: the column each row writes this step (`[rows, 1, 1, 1]`
    /// int64), which is also its query's index; `None` otherwise.
    pub fn slot_columns(&self) -> Option<&Tensor> {
        self.columns.as_ref()
    }

    /// Positions already cached.
    pub fn len(&self) -> i64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends this step's keys and values for `layer`, returning all of them.
    /// The last layer's append advances the length.
    pub fn append(&mut self, layer: usize, k: Tensor, v: Tensor) -> (Tensor, Tensor) {
        if let Some(columns) = self.columns.as_ref().map(Tensor::shallow_clone) {
            let len = self.len;
            let (kb, vb) = self.slot_buffers(layer, &k);
            let index = columns.expand(k.size().as_slice(), false);
            let _ = kb.scatter_(2, &index, &k);
            let _ = vb.scatter_(2, &index, &v);
            return (kb.narrow(2, 0, len), vb.narrow(2, 0, len));
        }
        let t = k.size()[2];
        let end = self.len + t;
        let out = match (self.layers[layer].take(), self.capacity) {
            (None, Some(cap)) if end <= cap => {
                let mut shape = k.size();
                shape[2] = cap;
                let kb = Tensor::zeros(&shape, (k.kind(), k.device()));
                let vb = Tensor::zeros(&shape, (v.kind(), v.device()));
                kb.narrow(2, 0, t).copy_(&k);
                vb.narrow(2, 0, t).copy_(&v);
                let out = (kb.narrow(2, 0, end), vb.narrow(2, 0, end));
                self.layers[layer] = Some((kb, vb));
                out
            }
            (Some((kb, vb)), Some(_)) if end <= kb.size()[2] => {
                kb.narrow(2, self.len, t).copy_(&k);
                vb.narrow(2, self.len, t).copy_(&v);
                let out = (kb.narrow(2, 0, end), vb.narrow(2, 0, end));
                self.layers[layer] = Some((kb, vb));
                out
            }
            (Some((pk, pv)), _) => {
                // Past the capacity (or none): grow by concatenation.
                let (pk, pv) = (pk.narrow(2, 0, self.len), pv.narrow(2, 0, self.len));
                let (k, v) = (Tensor::cat(&[pk, k], 2), Tensor::cat(&[pv, v], 2));
                self.layers[layer] = Some((k.shallow_clone(), v.shallow_clone()));
                (k, v)
            }
            (None, _) => {
                self.layers[layer] = Some((k.shallow_clone(), v.shallow_clone()));
                (k, v)
            }
        };
        if layer + 1 == self.layers.len() {
            self.len = end;
        }
        out
    }

    /// Keeps only the rows in `index` (drops finished sequences).
    pub fn select_rows(&mut self, index: &Tensor) {
        self.slot_rows = index.size()[0];
        for (k, v) in self.layers.iter_mut().flatten() {
            *k = k.index_select(0, index);
            *v = v.index_select(0, index);
        }
    }
}

/// The boolean mask (`true` = may attend) for queries at the last `q_len`
/// of `attention_mask`'s positions (see [`query_mask`]).
///
/// # Shapes
/// `attention_mask`: `[batch, kv_len]` (0/1) -> `[batch, 1, q_len, kv_len]`.
pub fn attention_mask(attention_mask: &Tensor, q_len: i64) -> Tensor {
    let kv_len = attention_mask.size()[1];
    let q_index = Tensor::arange_start(
        kv_len - q_len,
        kv_len,
        (Kind::Int64, attention_mask.device()),
    );
    query_mask(attention_mask, &q_index.view([1, q_len]))
}

/// The boolean mask (`true` = may attend) for queries at positions
/// `q_index` of a sequence whose keys are `attention_mask`.
///
/// A query attends to keys at or before its own position whose mask is 1.
/// A padding query would attend to nothing (a NaN softmax), so it attends
/// to itself: its output is never used, as in transformers' SDPA path.
///
/// # Shapes
/// `attention_mask`: `[batch, kv_len]` (0/1); `q_index`: `[batch or 1, q]`
/// int64 -> `[batch, 1, q, kv_len]`.
pub fn query_mask(attention_mask: &Tensor, q_index: &Tensor) -> Tensor {
    let kv_len = attention_mask.size()[1];
    let (rows, q_len) = q_index.size2().expect("q_index is [batch or 1, q]");
    let q_pos = q_index.view([rows, 1, q_len, 1]);
    let k_pos =
        Tensor::arange(kv_len, (Kind::Int64, attention_mask.device())).view([1, 1, 1, kv_len]);
    let keys = attention_mask.to_kind(Kind::Bool).view([-1, 1, 1, kv_len]);
    k_pos
        .le_tensor(&q_pos)
        .logical_and(&keys)
        .logical_or(&k_pos.eq_tensor(&q_pos))
}

/// The positions a forward pass keeps: its last block computes queries,
/// attention output and MLP only there (keys and values still cover every
/// position), and it returns their hidden states alone.
#[derive(Debug)]
pub struct Queries {
    /// `(start, len)` when the positions are one span shared by every row
    /// (taken with a view, not a copy).
    span: Option<(i64, i64)>,
    /// `[batch or 1, q]` int64: the kept positions of each row.
    index: Tensor,
    /// Which keys each kept query may see.
    pub mask: Mask,
}

impl Queries {
    /// `len` positions from `start` in every row of a batch with keys
    /// `attention_mask` (`[batch, t]`, 0/1).
    pub fn span(attention_mask: &Tensor, start: i64, len: i64) -> Queries {
        let index =
            Tensor::arange_start(start, start + len, (Kind::Int64, attention_mask.device()))
                .view([1, len]);
        Queries {
            span: Some((start, len)),
            mask: Mask::Explicit(query_mask(attention_mask, &index)),
            index,
        }
    }

    /// One position per row: `index` `[batch]` int64.
    pub fn one_per_row(attention_mask: &Tensor, index: &Tensor) -> Queries {
        let index = index.view([-1, 1]);
        Queries {
            span: None,
            mask: Mask::Explicit(query_mask(attention_mask, &index)),
            index,
        }
    }

    /// [`Queries::mask`] narrowed to a sliding window over `kv_len` keys
    /// (see [`Mask::windowed`]).
    pub fn windowed_mask(&self, kv_len: i64, window: i64) -> Mask {
        let (rows, q) = self.index.size2().expect("index is [batch or 1, q]");
        let device = self.index.device();
        let k = Tensor::arange(kv_len, (Kind::Int64, device)).view([1, 1, 1, kv_len]);
        let band = k.gt_tensor(&(self.index.view([rows, 1, q, 1]) - window));
        match &self.mask {
            Mask::Explicit(m) => Mask::Explicit(band.logical_and(m)),
            other => other.windowed(q, kv_len, window, device),
        }
    }

    /// The kept positions per row.
    pub fn per_row(&self) -> i64 {
        self.index.size()[1]
    }

    /// The kept positions of `x` along its time dimension `dim` (batch
    /// first).
    ///
    /// # Shapes
    /// `x`: `[b, .., t, ..]` -> `[b, .., q, ..]`.
    pub fn take(&self, x: &Tensor, dim: i64) -> Tensor {
        if let Some((start, len)) = self.span {
            return x.narrow(dim, start, len);
        }
        let mut shape = x.size();
        let mut view = vec![1i64; shape.len()];
        view[0] = self.index.size()[0];
        view[dim as usize] = self.per_row();
        shape[dim as usize] = self.per_row();
        x.gather(
            dim,
            &self
                .index
                .view(view.as_slice())
                .expand(shape.as_slice(), false),
            false,
        )
    }
}

/// Which keys each query may see.
#[derive(Debug)]
pub enum Mask {
    /// Plain causal attention over an unpadded batch with no cache: the
    /// kernel's own causal path, no mask tensor (fastest; flash on CUDA).
    Causal,
    /// Every query may attend to every key (one decoding step, no padding).
    None,
    /// From [`attention_mask`]: `[b, 1, q, kv]`, `true` = may attend.
    Explicit(Tensor),
}

impl Mask {
    /// The same mask, sharing its tensor.
    pub fn shallow_clone(&self) -> Mask {
        match self {
            Mask::Causal => Mask::Causal,
            Mask::None => Mask::None,
            Mask::Explicit(m) => Mask::Explicit(m.shallow_clone()),
        }
    }

    /// The mask for `q_len` new queries over `mask` (`[b, past + q]`, 0/1).
    pub fn new(mask: &Tensor, q_len: i64) -> Mask {
        let kv_len = mask.size()[1];
        let unpadded = mask.min().int64_value(&[]) == 1;
        match (unpadded, q_len) {
            (true, q) if q == kv_len => Mask::Causal,
            // One new query sees every cached key: no mask at all.
            (true, 1) => Mask::None,
            // One new query: only the keys' padding matters.
            (false, 1) => Mask::Explicit(mask.to_kind(Kind::Bool).view([-1, 1, 1, kv_len])),
            _ => Mask::Explicit(attention_mask(mask, q_len)),
        }
    }
}

impl Mask {
    /// This mask for the last `q_len` of `kv_len` positions, narrowed to a
    /// sliding window: a query sees keys less than `window` positions
    /// before it (transformers' `kv_idx > q_idx - sliding_window`, indices
    /// into the padded sequence).
    pub fn windowed(&self, q_len: i64, kv_len: i64, window: i64, device: tch::Device) -> Mask {
        let q = Tensor::arange_start(kv_len - q_len, kv_len, (Kind::Int64, device))
            .view([1, 1, q_len, 1]);
        self.windowed_at(&q, kv_len, window)
    }

    /// This mask for queries at `q_index` (`[rows or 1, 1, q, 1]` int64:
    /// in slot mode each row's own column) over `kv_len` keys, narrowed to
    /// a sliding window (see [`Mask::windowed`]).
    pub fn windowed_at(&self, q_index: &Tensor, kv_len: i64, window: i64) -> Mask {
        let k = Tensor::arange(kv_len, (Kind::Int64, q_index.device())).view([1, 1, 1, kv_len]);
        let band = k.gt_tensor(&(q_index - window));
        Mask::Explicit(match self {
            Mask::Causal => band.logical_and(&k.le_tensor(q_index)),
            Mask::None => band,
            Mask::Explicit(m) => band.logical_and(m),
        })
    }
}

/// How attention scores are formed before the softmax.
#[derive(Debug, Clone, Default)]
pub struct Scores {
    /// The factor on `q . k` (default `head_dim^-0.5`).
    pub scale: Option<f64>,
    /// `cap * tanh(scores / cap)` (Gemma 2): no fused kernel has it, so the
    /// scores are computed here, as transformers' eager attention does.
    pub softcap: Option<f64>,
}

/// Scaled-dot-product attention (grouped-query aware): libtorch's fused
/// kernel, or the explicit computation when scores are soft-capped.
///
/// # Shapes
/// `q`: `[b, heads, q, d]`; `k`, `v`: `[b, kv_heads, kv, d]` -> `[b, heads, q, d]`.
pub fn attend(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Mask,
    scores: &Scores,
    dropout: f64,
    train: bool,
) -> Tensor {
    let heads = q.size()[1];
    let kv_heads = k.size()[1];
    let (k, v) = if heads == kv_heads {
        (k.shallow_clone(), v.shallow_clone())
    } else {
        // Expanding here keeps every backend on its fused path (the
        // `enable_gqa` flag is not implemented by all of them).
        let rep = heads / kv_heads;
        (
            k.repeat_interleave_self_int(rep, 1, None),
            v.repeat_interleave_self_int(rep, 1, None),
        )
    };
    let p = if train { dropout } else { 0.0 };
    if let Some(cap) = scores.softcap {
        return capped(q, &k, &v, mask, scores.scale, cap, p, train);
    }
    let scale = scores.scale;
    match mask {
        Mask::Causal => {
            Tensor::scaled_dot_product_attention::<Tensor>(q, &k, &v, None, p, true, scale, false)
        }
        Mask::None => {
            Tensor::scaled_dot_product_attention::<Tensor>(q, &k, &v, None, p, false, scale, false)
        }
        Mask::Explicit(m) => {
            Tensor::scaled_dot_product_attention(q, &k, &v, Some(m), p, false, scale, false)
        }
    }
}

/// Attention with soft-capped scores, as transformers' eager path: scores
/// scaled, capped, masked, soft-maxed in float32, then cast back.
#[allow(clippy::too_many_arguments)]
fn capped(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Mask,
    scale: Option<f64>,
    cap: f64,
    dropout: f64,
    train: bool,
) -> Tensor {
    let d = *q.size().last().expect("q is [b, h, q, d]");
    let scale = scale.unwrap_or((d as f64).powf(-0.5));
    let s = q.matmul(&k.transpose(-2, -1)) * scale;
    let s = (s / cap).tanh() * cap;
    let (q_len, kv_len) = (q.size()[2], k.size()[2]);
    let allowed = match mask {
        Mask::None => None,
        Mask::Causal => Some(Mask::Causal.windowed(q_len, kv_len, kv_len + 1, q.device())),
        Mask::Explicit(_) => Some(mask.shallow_clone()),
    };
    let s = match allowed {
        Some(Mask::Explicit(m)) => s.masked_fill(&m.logical_not(), f64::NEG_INFINITY),
        _ => s,
    };
    let w = s.softmax(-1, Kind::Float).to_kind(q.kind());
    let w = if train && dropout > 0.0 {
        w.dropout(dropout, true)
    } else {
        w
    };
    w.matmul(v)
}
