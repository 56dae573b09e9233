//! The prefill-fairness line of `exo bench-serve`: how long a short request takes
//! alone, and sent while a long prompt's prefill is under way (a quarter of the
//! long prompt's time alone after it, as a request arriving at any moment would),
//! on an in-process `exo serve` through real HTTP. Runs interleaved, medians and
//! their ratio reported; the long request's own time alone and with the short one
//! beside it shows what fairness costs it.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use exo::tokenizer::Tokenizer;

use crate::bench::{median, turns};
use crate::bench_serve::{stream_one, InProcess};
use crate::http_client;

/// The short request: its prompt and the tokens it asks for.
const SHORT: (&str, usize) = ("The capital of France is", 8);

/// Text repeated into the long prompt.
const FILLER: &str = "In the old harbour town the fishermen mended their nets each morning, \
     told stories of storms and calm seas, and watched the gulls circle the boats. ";

/// One completion to its end: seconds.
async fn complete(addr: SocketAddr, body: &serde_json::Value) -> Result<f64> {
    let t0 = Instant::now();
    let r = http_client::post_json(addr, "/v1/completions", body).await?;
    if r.status() != hyper::StatusCode::OK {
        bail!("server answered: {}", r.status_line());
    }
    r.text().await?;
    Ok(t0.elapsed().as_secs_f64())
}

/// The short request, streamed: (seconds to its first token, to its end).
async fn short(addr: SocketAddr) -> Result<(f64, f64)> {
    let t0 = Instant::now();
    let (ttft, _) = stream_one(addr, SHORT.0, SHORT.1).await?;
    Ok((ttft, t0.elapsed().as_secs_f64()))
}

/// The long request, and the short one sent `after` it: ((short's first token,
/// short's end), long seconds).
async fn together(
    addr: SocketAddr,
    long: &serde_json::Value,
    after: Duration,
) -> Result<((f64, f64), f64)> {
    let long_task = {
        let long = long.clone();
        tokio::spawn(async move { complete(addr, &long).await })
    };
    tokio::time::sleep(after).await;
    let s = short(addr).await?;
    let l = long_task.await??;
    Ok((s, l))
}

/// Prints the short request's latency alone and beside a `long`-token prefill.
pub fn run(
    rt: &tokio::runtime::Runtime,
    model: &Path,
    threads: usize,
    long: usize,
    reps: usize,
) -> Result<()> {
    let settings = InProcess::settings(model, threads, long + 64, 2);
    let batch = settings.batch;
    let server = InProcess::start(rt, settings)?;
    let addr = server.addr;
    let tok = Tokenizer::load(model, "gemma3")?;
    let mut ids = Vec::new();
    while ids.len() < long {
        ids.extend(tok.encode(FILLER)?);
    }
    ids.truncate(long);
    let long_body = serde_json::json!({"prompt": ids, "max_tokens": 1, "temperature": 0});
    let short_body =
        serde_json::json!({"prompt": SHORT.0, "max_tokens": SHORT.1, "temperature": 0});
    let result = rt.block_on(async {
        let mut up = false;
        for _ in 0..600 {
            if complete(addr, &short_body).await.is_ok() {
                up = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if !up {
            bail!("the server did not come up");
        }
        // a warm-up run of the long prompt (not counted) times it alone
        let after = Duration::from_secs_f64(complete(addr, &long_body).await? / 4.0);
        // first tokens and ends of the short request, alone and beside; the long one
        let [mut f_alone, mut f_with, mut e_alone, mut e_with, mut l_alone, mut l_with] =
            [(); 6].map(|()| Vec::new());
        for rep in 0..reps {
            for which in turns(rep) {
                if which == 0 {
                    let (f, e) = short(addr).await?;
                    f_alone.push(f);
                    e_alone.push(e);
                    l_alone.push(complete(addr, &long_body).await?);
                } else {
                    let ((f, e), l) = together(addr, &long_body, after).await?;
                    f_with.push(f);
                    e_with.push(e);
                    l_with.push(l);
                }
            }
        }
        Ok([
            &mut f_alone,
            &mut f_with,
            &mut e_alone,
            &mut e_with,
            &mut l_alone,
            &mut l_with,
        ]
        .map(|v| median(v)))
    });
    server.stop(rt);
    let [f_alone, f_with, e_alone, e_with, l_alone, l_with] = result?;
    let ms = |a: f64, b: f64| format!("{:.0} ms, {:.0} ms ({:.1}x)", a * 1e3, b * 1e3, b / a);
    println!(
        "prefill fairness ({threads} threads, batch {batch}, {reps} interleaved repetitions), \
         alone vs sent a quarter into the prefill of a {long}-token prompt:"
    );
    println!(
        "  {}-token request, first token: {}",
        SHORT.1,
        ms(f_alone, f_with)
    );
    println!(
        "  {}-token request, whole:       {}",
        SHORT.1,
        ms(e_alone, e_with)
    );
    println!("  the long prompt, whole:        {}", ms(l_alone, l_with));
    Ok(())
}
