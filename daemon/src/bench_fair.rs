//! The prefill-fairness line of `exo bench-serve`: how long a short request takes
//! alone, and sent while a long prompt's prefill is under way (after its first
//! chunk), on an in-process `exo serve` through real HTTP. Runs interleaved, medians
//! and their ratio reported; the long request's own time alone and with the short
//! one beside it shows what fairness costs it.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use exo::tokenizer::Tokenizer;

use crate::bench::{median, turns};
use crate::bench_serve::InProcess;
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

/// Engine steps completed so far (`exo_step_seconds_count` of /metrics).
async fn steps(addr: SocketAddr) -> Result<f64> {
    let text = http_client::get(addr, "/metrics").await?.text().await?;
    text.lines()
        .find_map(|l| l.strip_prefix("exo_step_seconds_count "))
        .and_then(|v| v.trim().parse().ok())
        .context("no exo_step_seconds_count in /metrics")
}

/// The long request, and the short one sent once the long prompt's first chunk has
/// been computed: (short seconds, long seconds).
async fn together(
    addr: SocketAddr,
    long: &serde_json::Value,
    short: &serde_json::Value,
) -> Result<(f64, f64)> {
    let before = steps(addr).await?;
    let long_task = {
        let long = long.clone();
        tokio::spawn(async move { complete(addr, &long).await })
    };
    let deadline = Instant::now() + Duration::from_secs(600);
    while steps(addr).await? < before + 1.0 {
        if Instant::now() > deadline {
            bail!("the long prompt's first chunk never finished");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let s = complete(addr, short).await?;
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
        let (mut s_alone, mut s_with, mut l_alone, mut l_with) = (vec![], vec![], vec![], vec![]);
        for rep in 0..reps {
            for which in turns(rep) {
                if which == 0 {
                    s_alone.push(complete(addr, &short_body).await?);
                    l_alone.push(complete(addr, &long_body).await?);
                } else {
                    let (s, l) = together(addr, &long_body, &short_body).await?;
                    s_with.push(s);
                    l_with.push(l);
                }
            }
        }
        Ok((
            median(&mut s_alone),
            median(&mut s_with),
            median(&mut l_alone),
            median(&mut l_with),
        ))
    });
    server.stop(rt);
    let (s_alone, s_with, l_alone, l_with) = result?;
    println!(
        "prefill fairness ({threads} threads, batch {batch}, {reps} interleaved repetitions): \
         a {}-token request takes {:.0} ms alone, {:.0} ms sent during the prefill of a \
         {long}-token prompt ({:.1}x); that prompt takes {:.0} ms alone, {:.0} ms with it ({:.2}x)",
        SHORT.1,
        s_alone * 1e3,
        s_with * 1e3,
        s_with / s_alone,
        l_alone * 1e3,
        l_with * 1e3,
        l_with / l_alone
    );
    Ok(())
}
