//! The candle model against a naive dense implementation, and paged against dense KV.

mod common;

use common::{argmax, naive_forward, prompt};
use pd_engine::kv_cache::{DenseKv, KvStore};
use pd_engine::model::{greedy, Model, ModelConfig, ModelWeights};
use pd_engine::{Engine, EngineOptions, KvCache, KvDtype};

/// Block-aligned spans of 16, as the engine prefills.
fn chunks(n: usize) -> Vec<(usize, usize)> {
    (0..n).step_by(16).map(|s| (s, (s + 16).min(n))).collect()
}

#[test]
fn shapes_and_config_checks() {
    let d = ModelConfig::default();
    assert_eq!(
        (d.layers, d.hidden, d.q_heads, d.kv_heads, d.head_dim, d.vocab),
        (8, 256, 8, 2, 32, 4096)
    );
    assert_eq!(
        d.kv_layout(16, KvDtype::F32).bytes_per_token(),
        2 * 8 * 2 * 32 * 4
    );
    let w = ModelWeights::seeded(&d);
    assert_eq!(w.embed.len(), 4096 * 256);
    assert_eq!(w.layers.len(), 8);
    assert_eq!(w.layers[0].wq.len(), 256 * 256);
    assert_eq!(w.layers[0].wk.len(), 64 * 256);
    assert_eq!(w.layers[0].w_down.len(), 256 * d.intermediate);
    assert_eq!(
        w,
        ModelWeights::seeded(&d),
        "seeded weights are reproducible"
    );
    assert_ne!(
        w.layers[0].wq,
        ModelWeights::seeded(&ModelConfig { seed: 1, ..d }).layers[0].wq
    );
    for bad in [
        ModelConfig {
            q_heads: 6,
            kv_heads: 4,
            ..d
        },
        ModelConfig { head_dim: 31, ..d },
        ModelConfig { layers: 0, ..d },
    ] {
        assert!(Model::new(bad).is_err(), "{bad:?}");
    }
    assert_ne!(d.fingerprint(), ModelConfig { seed: 9, ..d }.fingerprint());

    let cfg = ModelConfig::tiny();
    let m = Model::new(cfg).unwrap();
    let mut kv = DenseKv::new(cfg.kv_layout(16, KvDtype::F32));
    let logits = m.forward(&[1, 2, 3], 0, &mut kv, true).unwrap().unwrap();
    assert_eq!(logits.len(), cfg.vocab);
    assert_eq!(kv.len(0), 3);
    assert!(m.forward(&[1], 3, &mut kv, false).unwrap().is_none());
    assert_eq!(kv.len(cfg.layers - 1), 4);
    assert!(
        m.forward(&[cfg.vocab as u32], 4, &mut kv, true).is_err(),
        "token outside vocab"
    );
    assert!(m.forward(&[], 4, &mut kv, true).is_err());
    assert!(m
        .forward(&[1, 2], cfg.max_positions - 1, &mut kv, true)
        .is_err());
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Model>();
    send_sync::<Engine>();
    send_sync::<pd_engine::Sequence>();
    assert!(greedy(&[0.0, f32::NAN]).is_err());
    assert_eq!(
        greedy(&[1.0, 3.0, 3.0, -1.0]).unwrap(),
        1,
        "first maximum on ties"
    );
}

/// RoPE, GQA attention, norms and the MLP agree with plain loops in f64: logits within
/// tolerance, K/V within tolerance, and the same greedy tokens.
#[test]
fn candle_model_matches_naive_dense_reference() {
    let cfg = ModelConfig::tiny();
    let w = ModelWeights::seeded(&cfg);
    let m = Model::from_weights(cfg, &w).unwrap();
    let toks = prompt(37, cfg.vocab, 3);
    let mut kv = DenseKv::new(cfg.kv_layout(16, KvDtype::F32));
    let mut logits = None;
    for (s, e) in chunks(toks.len()) {
        logits = m.forward(&toks[s..e], s, &mut kv, e == toks.len()).unwrap();
    }
    let logits = logits.unwrap();
    let naive = naive_forward(&cfg, &w, &toks);
    let scale = naive.logits.iter().fold(1.0f64, |a, x| a.max(x.abs()));
    let err = logits
        .iter()
        .zip(&naive.logits)
        .fold(0.0f64, |a, (x, y)| a.max((*x as f64 - y).abs()));
    assert!(err < 1e-4 * scale, "logits differ by {err} (scale {scale})");
    // K and V of every layer (naive is [pos][head][dim]; DenseKv reads [head][pos][dim]).
    let (nkv, d) = (cfg.kv_heads, cfg.head_dim);
    for (l, (nk, nv)) in naive.kv.iter().enumerate() {
        let (k, v) = kv.read(l, toks.len()).unwrap();
        for (ours, theirs) in [(&k, nk), (&v, nv)] {
            for p in 0..toks.len() {
                for h in 0..nkv {
                    for i in 0..d {
                        let a = ours[(h * toks.len() + p) * d + i] as f64;
                        let b = theirs[(p * nkv + h) * d + i];
                        assert!(
                            (a - b).abs() < 1e-4 * (1.0 + b.abs()),
                            "layer {l} pos {p} head {h}: {a} vs {b}"
                        );
                    }
                }
            }
        }
    }
    // Greedy generation: the engine against the naive model re-run on the whole sequence.
    let mut engine = Engine::new(
        cfg,
        EngineOptions {
            num_blocks: 16,
            ..Default::default()
        },
    )
    .unwrap();
    let ours = engine.generate(&toks, 6).unwrap().tokens;
    let mut seq = toks.clone();
    for (i, t) in ours.iter().enumerate() {
        let want = argmax(&naive_forward(&cfg, &w, &seq).logits);
        assert_eq!(*t, want, "token {i}");
        seq.push(want);
    }
}

/// The same spans over the paged cache (a scrambled block table) and over a dense
/// store give the same bits: logits and every K/V element.
#[test]
fn paged_and_dense_kv_are_bit_identical() {
    let cfg = ModelConfig::tiny();
    let m = Model::new(cfg).unwrap();
    let layout = cfg.kv_layout(16, KvDtype::F32);
    let toks = prompt(70, cfg.vocab, 5);
    let mut cache = KvCache::new(layout, 12).unwrap();
    let table = [9, 2, 11, 0, 5];
    let mut dense = DenseKv::new(layout);
    let (mut lp, mut ld) = (Vec::new(), Vec::new());
    // Prefill chunks, then three single-token steps.
    let spans: Vec<(usize, usize)> = chunks(67)
        .into_iter()
        .chain([(67, 68), (68, 69), (69, 70)])
        .collect();
    for (s, e) in spans {
        lp.push(
            m.forward(&toks[s..e], s, &mut cache.paged(&table), true)
                .unwrap()
                .unwrap(),
        );
        ld.push(
            m.forward(&toks[s..e], s, &mut dense, true)
                .unwrap()
                .unwrap(),
        );
    }
    let bits = |v: &Vec<Vec<f32>>| v.iter().flatten().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&lp), bits(&ld));
    for l in 0..cfg.layers {
        let (pk, pv) = cache.paged(&table).read(l, 70).unwrap();
        let (dk, dv) = dense.read(l, 70).unwrap();
        let b = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!((b(&pk), b(&pv)), (b(&dk), b(&dv)), "layer {l}");
    }
}
