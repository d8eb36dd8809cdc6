//! `lm.pretrain`: a fresh causal LM trained on a corpus packed into
//! fixed-length blocks (texts joined by EOS), so pipelines run offline
//! from nothing.

use anyhow::Context;
use tch::Tensor;

use alignflow_ops::protocol::Metrics;
use alignflow_ops::text::Tokenizer;
use alignflow_ops::{corpus_texts, Family, PretrainParams, StageContext};

use super::training::{causal_lm_loss, run_training, BatchLoss};
use crate::model::{self, BuildOptions, Head, Model, ModelConfig};

pub fn run(ctx: &StageContext<'_>) -> anyhow::Result<Metrics> {
    let p: PretrainParams = ctx.params()?;
    let device = model::device(&ctx.spec.device)?;
    let tok_dir = ctx.input("tokenizer")?;
    let tokenizer = Tokenizer::from_dir(tok_dir)?;
    let eos = tokenizer.eos_id.context("the tokenizer has no EOS token")? as i64;
    anyhow::ensure!(
        p.seq_len <= p.positions,
        "seq_len {} exceeds positions {}",
        p.seq_len,
        p.positions
    );

    ctx.reporter.progress(0, None, "tokenizing the corpus");
    let texts = corpus_texts(ctx, ctx.input("data")?, &p.fields)?;
    let mut stream: Vec<i64> = Vec::new();
    for text in &texts {
        stream.extend(tokenizer.encode_start(text)?);
        stream.push(eos);
    }
    let block = p.seq_len as usize;
    let blocks = stream.len() / block;
    anyhow::ensure!(
        blocks > 0,
        "stage `{}`: the corpus has {} tokens, fewer than one block of seq_len {}",
        ctx.spec.stage,
        stream.len(),
        block
    );
    let data = Tensor::from_slice(&stream[..blocks * block]).view([blocks as i64, p.seq_len]);

    let vocab = tokenizer.vocab_size() as i64;
    let config = match p.arch {
        Family::Gpt2 => ModelConfig::gpt2_json(
            vocab,
            p.positions,
            p.width,
            p.layers,
            p.heads,
            eos,
            p.dropout,
        ),
        Family::Llama => ModelConfig::llama_json(
            vocab,
            p.positions,
            p.width,
            p.layers,
            p.heads,
            p.kv_heads.unwrap_or(p.heads),
            p.width * 8 / 3 / 64 * 64 + 64,
            eos,
            true,
        ),
    };
    let cfg = ModelConfig::from_json(config)?;
    tch::manual_seed(ctx.spec.seed as i64);
    let mut model = Model::init(&cfg, &BuildOptions::new(device, Head::Lm));
    model.source = Some(tok_dir.to_path_buf());

    let mut loss_fn = |m: &Model, idx: &[usize]| -> anyhow::Result<BatchLoss> {
        let index = Tensor::from_slice(&idx.iter().map(|&i| i as i64).collect::<Vec<_>>());
        let ids = data.index_select(0, &index).to_device(device);
        let mask = ids.ones_like();
        let (loss, counted) = causal_lm_loss(m, &ids, &mask, &ids, true);
        Ok(BatchLoss {
            loss,
            tokens: counted,
            weight: counted as f64,
        })
    };
    let mut metrics = run_training(ctx, &mut model, &p.train, p.lr, blocks, &mut loss_fn)?;
    metrics.insert("blocks".into(), blocks.into());
    metrics.insert("corpus_tokens".into(), stream.len().into());
    Ok(metrics)
}
