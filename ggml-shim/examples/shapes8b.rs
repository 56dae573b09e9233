//! Times the per-column products of batch-invariant decoding on Llama 3 8B's matrix
//! shapes and types (Q4_K_M: Q4_K repacked by ggml, Q6_K plain for `attn_v` and
//! `ffn_down` of 16 of the 32 layers and for the output head), at 1, 2, 4 and 8
//! columns, and adds them up to one decode step of the whole model per type. Each
//! kind is timed over enough copies of its matrix that they do not fit in cache.
//! Both wall and process CPU time are printed (CPU time is what counts on a machine
//! shared with other work).
//!
//! `cargo run --release -p ggml-shim --example shapes8b [reps] [columns,...]`

use ggml_shim::writer::WriterType;
use ggml_shim::{
    set_tensor_data, Allocator, CpuBackend, DType, GraphBuilder, Placement, TensorSpec, TensorStore,
};

/// One kind of matrix of the model: `[k, m]`, its type and how many the model has.
struct Kind {
    name: &'static str,
    ty: WriterType,
    k: usize,
    m: usize,
    in_model: usize,
}

const KINDS: [Kind; 9] = [
    Kind {
        name: "attn_q+attn_output",
        ty: WriterType::Q4_K,
        k: 4096,
        m: 4096,
        in_model: 64,
    },
    Kind {
        name: "attn_k",
        ty: WriterType::Q4_K,
        k: 4096,
        m: 1024,
        in_model: 32,
    },
    Kind {
        name: "attn_v (Q4_K layers)",
        ty: WriterType::Q4_K,
        k: 4096,
        m: 1024,
        in_model: 16,
    },
    Kind {
        name: "ffn_gate+ffn_up",
        ty: WriterType::Q4_K,
        k: 4096,
        m: 14336,
        in_model: 64,
    },
    Kind {
        name: "ffn_down (Q4_K layers)",
        ty: WriterType::Q4_K,
        k: 14336,
        m: 4096,
        in_model: 16,
    },
    Kind {
        name: "attn_v (Q6_K layers)",
        ty: WriterType::Q6_K,
        k: 4096,
        m: 1024,
        in_model: 16,
    },
    Kind {
        name: "ffn_down (Q6_K layers)",
        ty: WriterType::Q6_K,
        k: 14336,
        m: 4096,
        in_model: 16,
    },
    Kind {
        name: "output",
        ty: WriterType::Q6_K,
        k: 4096,
        m: 128256,
        in_model: 1,
    },
    Kind {
        name: "attn_q (one, cached)",
        ty: WriterType::Q4_K,
        k: 4096,
        m: 4096,
        in_model: 0,
    },
];

/// Random quant blocks with small finite scales (what `exo gen-model` writes).
fn random_blocks(ty: WriterType, k: usize, m: usize, seed: u64) -> Vec<u8> {
    let mut s = seed | 1;
    let mut bytes: Vec<u8> = (0..ty.row_size(k) * m)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s as u8
        })
        .collect();
    let d = 0x1c00u16.to_le_bytes(); // 1/256
    match ty {
        WriterType::Q4_K => bytes.chunks_exact_mut(144).for_each(|b| {
            b[0..2].copy_from_slice(&d);
            b[2..4].copy_from_slice(&d);
        }),
        WriterType::Q6_K => bytes
            .chunks_exact_mut(210)
            .for_each(|b| b[208..210].copy_from_slice(&d)),
        _ => unreachable!(),
    }
    bytes
}

fn cpu_seconds() -> f64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid out pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut t) };
    t.tv_sec as f64 + t.tv_nsec as f64 * 1e-9
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let mut args = std::env::args().skip(1);
    let reps: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(5);
    let counts: Vec<usize> = args
        .next()
        .map(|a| a.split(',').filter_map(|c| c.parse().ok()).collect())
        .unwrap_or(vec![1, 2, 4, 8]);
    let only: Option<String> = args.next();
    let mut backend = CpuBackend::new(1).expect("backend");
    println!("1 thread, median of {reps}; ms of CPU (wall) per matrix per step");
    let mut per_type = vec![[0.0f64; 2]; counts.len()];
    for (kind_i, kind) in KINDS.iter().enumerate() {
        if only
            .as_ref()
            .is_some_and(|o| !kind.name.contains(o.as_str()))
        {
            continue;
        }
        let bytes = kind.ty.row_size(kind.k) * kind.m;
        let copies = if kind.in_model == 0 {
            1
        } else {
            (256usize << 20).div_ceil(bytes).clamp(1, 16)
        };
        let specs: Vec<TensorSpec> = (0..copies)
            .map(|c| TensorSpec {
                name: format!("w{c}"),
                dtype: DType::from_raw(kind.ty.to_ggml()).expect("type"),
                ne: vec![kind.k as i64, kind.m as i64],
                placement: Placement::MatmulWeight,
            })
            .collect();
        let mut store = TensorStore::new(&specs, true).expect("store");
        for c in 0..copies {
            let name = format!("w{c}");
            let data = random_blocks(kind.ty, kind.k, kind.m, (kind_i * 100 + c) as u64 + 7);
            store.set(&name, &data).expect("set");
        }
        let repacked = store.is_repacked("w0");
        let mut graphs = Vec::new();
        for &n in &counts {
            let g = GraphBuilder::new(4 * copies + 16).expect("graph");
            let xt = g.input(DType::F32, &[kind.k as i64, n as i64]);
            g.name(xt, "x");
            for c in 0..copies {
                let w = store.get(&format!("w{c}")).expect("w");
                let y = g.mul_mat_per_column(w, xt);
                g.output(y);
            }
            let mut alloc = Allocator::new().expect("allocator");
            alloc.alloc(&g).expect("alloc");
            let x: Vec<f32> = (0..kind.k * n)
                .map(|i| ((i * 31) % 17) as f32 / 8.0 - 1.0)
                .collect();
            set_tensor_data(g.find("x").expect("x"), &x).expect("x");
            graphs.push((g, alloc));
        }
        let mut cpu = vec![Vec::new(); counts.len()];
        let mut wall = vec![Vec::new(); counts.len()];
        for _ in 0..reps {
            for (i, (g, _)) in graphs.iter().enumerate() {
                let (c0, t0) = (cpu_seconds(), std::time::Instant::now());
                backend.compute(g).expect("compute");
                cpu[i].push((cpu_seconds() - c0) * 1e3 / copies as f64);
                wall[i].push(t0.elapsed().as_secs_f64() * 1e3 / copies as f64);
            }
        }
        print!(
            "{:<24} {} [{:>5}, {:>6}]{} x{:<2}",
            kind.name,
            kind.ty.name(),
            kind.k,
            kind.m,
            if repacked { " repacked" } else { "         " },
            kind.in_model
        );
        for (i, &n) in counts.iter().enumerate() {
            let c = median(&mut cpu[i]);
            let w = median(&mut wall[i]);
            if std::env::var_os("MIN").is_some() {
                print!("  n{n}: {c:>7.2} ({w:>7.2}) min {:>7.2}", cpu[i][0]);
            } else {
                print!("  n{n}: {c:>7.2} ({w:>7.2})");
            }
            let t = usize::from(kind.ty == WriterType::Q6_K);
            per_type[i][t] += c * kind.in_model as f64;
        }
        println!();
    }
    println!("whole model, one decode step, ms of CPU (per token):");
    for (i, &n) in counts.iter().enumerate() {
        let [q4, q6] = per_type[i];
        println!(
            "  n{n}: Q4_K {q4:>8.1} ({:>6.1})  Q6_K {q6:>8.1} ({:>6.1})  Q6_K share {:>4.1}%",
            q4 / n as f64,
            q6 / n as f64,
            100.0 * q6 / (q4 + q6)
        );
    }
}
