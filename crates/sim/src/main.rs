//! `taidon-sim`: replays a synthetic trace under several store capacities, once with the
//! retention score and once with LRU, and prints a Markdown table.
//!
//! ```text
//! cargo run --release -p taidon-sim -- [--seed N] [--states N] [--accesses N]
//!     [--frequency W] [--build-cost W] [--size W] [--half-life-h H] [--max-replay-s S]
//! ```
#![deny(clippy::unwrap_used, clippy::todo, clippy::dbg_macro)]

use anyhow::Result;
use clap::Parser;
use taidon_core::policy::{Ranking, Weights};
use taidon_sim::{generate, simulate, total_bytes, SimConfig, SimResult, TraceSpec};

/// Replays a synthetic trace of prepares under store capacities of 5, 10 and 20% of the
/// states' total size, once ranked by the retention score and once by LRU.
#[derive(Debug, Parser)]
#[command(name = "taidon-sim", version)]
struct Args {
    /// Seed of the trace generator
    #[arg(long, default_value_t = TraceSpec::default().seed)]
    seed: u64,
    /// How many states the trace has
    #[arg(long, default_value_t = TraceSpec::default().states)]
    states: usize,
    /// How many accesses the trace has
    #[arg(long, default_value_t = TraceSpec::default().accesses)]
    accesses: usize,
    /// The Zipf exponent of state popularity
    #[arg(long, default_value_t = TraceSpec::default().zipf)]
    zipf: f64,
    /// Weight of access frequency in the score
    #[arg(long, default_value_t = Weights::default().frequency)]
    frequency: f64,
    /// Weight of build cost in the score
    #[arg(long = "build-cost", default_value_t = Weights::default().build_cost)]
    build_cost: f64,
    /// Weight of size in the score
    #[arg(long, default_value_t = Weights::default().size)]
    size: f64,
    /// Half-life of an access's weight, in hours
    #[arg(long = "half-life-h", value_name = "HOURS")]
    half_life_h: Option<f64>,
    /// The longest replay a checkpoint eviction may cause, in seconds
    #[arg(long = "max-replay-s", value_name = "SECONDS", default_value_t = 3600)]
    max_replay_s: u64,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let spec = TraceSpec {
        seed: args.seed,
        states: args.states,
        accesses: args.accesses,
        zipf: args.zipf,
        ..TraceSpec::default()
    };
    let mut weights = Weights {
        frequency: args.frequency,
        build_cost: args.build_cost,
        size: args.size,
        ..Weights::default()
    };
    if let Some(h) = args.half_life_h {
        weights.age_half_life_ms = (h * 3_600_000.0) as u64;
    }
    let max_replay_s = args.max_replay_s;
    let trace = generate(&spec);
    let total = total_bytes(&trace);
    println!(
        "trace: seed {}, {} states ({} projects), {} accesses over {} days, Zipf {}, total {} GiB",
        spec.seed,
        trace.states.len(),
        spec.projects,
        trace.ops.len(),
        spec.days,
        spec.zipf,
        total / (1 << 30)
    );
    println!(
        "weights: frequency {}, build_cost {}, size {}, half-life {} h; max replay {} s\n",
        weights.frequency,
        weights.build_cost,
        weights.size,
        weights.age_half_life_ms / 3_600_000,
        max_replay_s
    );
    println!("| capacity | policy | hit rate | rebuild time (h) | rebuilt states | evictions |");
    println!("|---|---|---|---|---|---|");
    for share in [0.05, 0.10, 0.20] {
        for ranking in [Ranking::Score, Ranking::Lru] {
            let config = SimConfig {
                capacity_bytes: (total as f64 * share) as u64,
                low_water: 0.9,
                max_replay_ms: max_replay_s * 1000,
                weights,
                ranking,
            };
            let r: SimResult = simulate(&trace, &config);
            println!(
                "| {:.0}% ({} GiB) | {} | {:.1}% | {:.1} | {} | {} |",
                share * 100.0,
                config.capacity_bytes / (1 << 30),
                match ranking {
                    Ranking::Score => "score",
                    Ranking::Lru => "LRU",
                },
                r.hit_rate() * 100.0,
                r.rebuild_ms as f64 / 3_600_000.0,
                r.rebuilt_states,
                r.evictions
            );
        }
    }
    Ok(())
}
