//! `taidon-sim`: replays a synthetic trace under several store capacities, once with the
//! retention score and once with LRU, and prints a Markdown table.
//!
//! ```text
//! cargo run --release -p taidon-sim -- [--seed N] [--states N] [--accesses N]
//!     [--frequency W] [--build-cost W] [--size W] [--half-life-h H] [--max-replay-s S]
//! ```
#![deny(clippy::unwrap_used, clippy::todo, clippy::dbg_macro)]

use anyhow::{bail, Context, Result};
use taidon_core::policy::{Ranking, Weights};
use taidon_sim::{generate, simulate, total_bytes, SimConfig, SimResult, TraceSpec};

fn main() -> Result<()> {
    let mut spec = TraceSpec::default();
    let mut weights = Weights::default();
    let mut max_replay_s: u64 = 3600;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--seed" => spec.seed = value()?.parse()?,
            "--states" => spec.states = value()?.parse()?,
            "--accesses" => spec.accesses = value()?.parse()?,
            "--zipf" => spec.zipf = value()?.parse()?,
            "--frequency" => weights.frequency = value()?.parse()?,
            "--build-cost" => weights.build_cost = value()?.parse()?,
            "--size" => weights.size = value()?.parse()?,
            "--half-life-h" => {
                weights.age_half_life_ms = (value()?.parse::<f64>()? * 3_600_000.0) as u64
            }
            "--max-replay-s" => max_replay_s = value()?.parse()?,
            other => bail!("unknown flag {other}"),
        }
    }
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
