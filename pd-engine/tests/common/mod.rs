//! A naive dense reference of the model (plain loops, f64 sums, no paging, no candle)
//! and helpers shared by the integration tests.

#![allow(dead_code)] // each test binary uses its own part

use pd_engine::model::{ModelConfig, ModelWeights};

/// `y = W x` for row-major `W` of `[out][in]`, in f64.
fn matvec(w: &[f32], x: &[f64], out: usize) -> Vec<f64> {
    let inp = x.len();
    (0..out)
        .map(|o| (0..inp).map(|i| w[o * inp + i] as f64 * x[i]).sum())
        .collect()
}

fn rms_norm(x: &[f64], w: &[f32], eps: f32) -> Vec<f64> {
    let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
    let r = 1.0 / (ms + eps as f64).sqrt();
    x.iter().zip(w).map(|(v, g)| v * r * *g as f64).collect()
}

/// Rotates each head's pairs `(i, i + d/2)` by `pos / theta^(2i/d)` (Llama's
/// rotate-half convention).
fn rope(x: &mut [f64], heads: usize, d: usize, pos: usize, theta: f64) {
    for h in 0..heads {
        for i in 0..d / 2 {
            let a = pos as f64 / theta.powf(2.0 * i as f64 / d as f64);
            let (c, s) = (a.cos(), a.sin());
            let (x1, x2) = (x[h * d + i], x[h * d + i + d / 2]);
            x[h * d + i] = x1 * c - x2 * s;
            x[h * d + i + d / 2] = x2 * c + x1 * s;
        }
    }
}

/// Output of the naive forward.
pub struct Dense {
    /// Logits after the last token.
    pub logits: Vec<f64>,
    /// Per layer, K and V as `[pos][kv_heads][head_dim]`.
    pub kv: Vec<(Vec<f64>, Vec<f64>)>,
}

/// The whole forward over `tokens` from position 0, densely.
pub fn naive_forward(cfg: &ModelConfig, w: &ModelWeights, tokens: &[u32]) -> Dense {
    let (h, d, nq, nkv) = (cfg.hidden, cfg.head_dim, cfg.q_heads, cfg.kv_heads);
    let g = nq / nkv;
    let n = tokens.len();
    let mut x: Vec<Vec<f64>> = tokens
        .iter()
        .map(|t| {
            w.embed[*t as usize * h..(*t as usize + 1) * h]
                .iter()
                .map(|v| *v as f64)
                .collect()
        })
        .collect();
    let mut kv_out = Vec::new();
    for lw in &w.layers {
        let mut qs = Vec::new();
        let (mut ks, mut vs) = (Vec::new(), Vec::new());
        for (p, xt) in x.iter().enumerate() {
            let hn = rms_norm(xt, &lw.attn_norm, cfg.rms_eps);
            let mut q = matvec(&lw.wq, &hn, nq * d);
            let mut k = matvec(&lw.wk, &hn, nkv * d);
            rope(&mut q, nq, d, p, cfg.rope_theta);
            rope(&mut k, nkv, d, p, cfg.rope_theta);
            qs.push(q);
            ks.push(k);
            vs.push(matvec(&lw.wv, &hn, nkv * d));
        }
        for t in 0..n {
            let mut o = vec![0f64; nq * d];
            for qh in 0..nq {
                let kh = qh / g;
                let q = &qs[t][qh * d..(qh + 1) * d];
                let scores: Vec<f64> = (0..=t)
                    .map(|j| {
                        q.iter()
                            .zip(&ks[j][kh * d..(kh + 1) * d])
                            .map(|(a, b)| a * b)
                            .sum::<f64>()
                            / (d as f64).sqrt()
                    })
                    .collect();
                let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for (j, p) in e.iter().enumerate() {
                    for i in 0..d {
                        o[qh * d + i] += p / z * vs[j][kh * d + i];
                    }
                }
            }
            let a = matvec(&lw.wo, &o, h);
            x[t].iter_mut().zip(a).for_each(|(v, a)| *v += a);
            let hn = rms_norm(&x[t], &lw.mlp_norm, cfg.rms_eps);
            let gate = matvec(&lw.w_gate, &hn, cfg.intermediate);
            let up = matvec(&lw.w_up, &hn, cfg.intermediate);
            let m: Vec<f64> = gate
                .iter()
                .zip(&up)
                .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
                .collect();
            let down = matvec(&lw.w_down, &m, h);
            x[t].iter_mut().zip(down).for_each(|(v, a)| *v += a);
        }
        kv_out.push((ks.concat(), vs.concat()));
    }
    let last = rms_norm(&x[n - 1], &w.norm, cfg.rms_eps);
    Dense {
        logits: matvec(&w.lm_head, &last, cfg.vocab),
        kv: kv_out,
    }
}

/// Greedy over f64 logits (first maximum).
pub fn argmax(xs: &[f64]) -> u32 {
    let mut best = 0;
    for (i, x) in xs.iter().enumerate() {
        if *x > xs[best] {
            best = i;
        }
    }
    best as u32
}

/// A deterministic prompt of `n` tokens below `vocab`.
pub fn prompt(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let mut r = pd_engine::rng::Rng::new(seed);
    (0..n).map(|_| r.below(vocab as u64) as u32).collect()
}

/// Runs the `pd-engine` binary: (success, stdout, stderr).
pub fn run(args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pd-engine"))
        .args(args)
        .output()
        .expect("the binary runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The value of `"key": value` in our one-line JSON.
pub fn field<'a>(json: &'a str, key: &str) -> &'a str {
    let pat = format!("\"{key}\": ");
    let at = json
        .find(&pat)
        .unwrap_or_else(|| panic!("{key} missing in {json}"))
        + pat.len();
    let rest = &json[at..];
    let end = rest.find([',', '}']).unwrap_or(rest.len());
    rest[..end].trim_matches('"')
}
