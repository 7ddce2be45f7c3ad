//! Restore throughput against a plain download of the same objects with the same client: the
//! benchmark `bench/bucket.py` runs this on a published snapshot directory.
//!
//! ```text
//! restore_throughput --endpoint http://127.0.0.1:8333 --url s3://snaps/bench \
//!     --snapshot <home>/snapshots/<state-id> [--rounds 3] [--parallelism 16]
//! ```
//!
//! Uploads the snapshot (if the bucket lacks it) and, beside it, each of its data files as one
//! plain object (`<prefix>/plain/<state>/<path>`, uncompressed). Then per round: the plain
//! download (GET every file object and write it into a directory, as `aws s3 sync` would),
//! the restore into a directory (download, decompress, verify every chunk, write, verify the
//! tree checksum), and a GET of every distinct chunk whose bytes are dropped (the transfer
//! alone). Prints one JSON line with the best time of each; `ratio` is plain / restore time
//! for the same logical bytes on disk.

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Instant;

use futures_util::{stream, StreamExt, TryStreamExt};
use taidon_store::Manifest;
use taidon_store_object::{Entry, RemoteConfig, RemoteStore};

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let need = |name: &str| arg(&args, name).ok_or(format!("{name} is required"));
    let config = RemoteConfig {
        url: need("--url")?,
        endpoint: Some(need("--endpoint")?),
        allow_http: true,
        region: "us-east-1".to_owned(),
    };
    let snapshot = PathBuf::from(need("--snapshot")?);
    let rounds: usize = arg(&args, "--rounds").map_or(Ok(3), |r| r.parse())?;
    let parallelism: usize = arg(&args, "--parallelism").map_or(Ok(16), |p| p.parse())?;
    let remote = RemoteStore::connect(&config)?.with_parallelism(parallelism);

    let local: Manifest = serde_json::from_slice(&std::fs::read(snapshot.join("manifest.json"))?)?;
    let id = local.state_id;
    let started = Instant::now();
    let report = remote.upload(&snapshot).await?;
    let upload_s = started.elapsed().as_secs_f64();
    let manifest = remote
        .remote_manifest(&id)
        .await?
        .ok_or("the manifest is missing after the upload")?;
    let mut seen = HashSet::new();
    let chunks: Vec<String> = manifest
        .entries
        .iter()
        .flat_map(|e| match e {
            Entry::File { chunks, .. } => chunks.clone(),
            _ => Vec::new(),
        })
        .filter(|h| seen.insert(h.clone()))
        .collect();

    // The same files as plain objects.
    let data = snapshot.join("data");
    let mut files = Vec::new();
    collect_files(&data, &data, &mut files)?;
    let plain_prefix = format!("plain/{id}");
    stream::iter(files.iter())
        .map(|rel| {
            let key = remote.key_for(&format!("{plain_prefix}/{rel}"));
            let (objects, path) = (remote.objects().clone(), data.join(rel));
            async move {
                if objects.head(&key).await.is_ok() {
                    return Ok(());
                }
                let bytes = tokio::fs::read(&path).await?;
                objects.put(&key, bytes.into()).await?;
                Ok::<(), Box<dyn std::error::Error + Send + Sync>>(())
            }
        })
        .buffer_unordered(parallelism)
        .try_collect::<Vec<()>>()
        .await
        .map_err(|e| e.to_string())?;

    let scratch = tempfile::tempdir_in(snapshot.parent().unwrap_or(&snapshot))?;
    let (mut plain_best, mut restore_best, mut chunks_best) = (f64::MAX, f64::MAX, f64::MAX);
    let mut compressed = 0u64;
    for round in 0..rounds {
        let target = scratch.path().join(format!("plain-{round}"));
        let started = Instant::now();
        stream::iter(files.iter())
            .map(|rel| {
                let key = remote.key_for(&format!("{plain_prefix}/{rel}"));
                let (objects, path) = (remote.objects().clone(), target.join(rel));
                async move {
                    let bytes = objects.get(&key).await?.bytes().await?;
                    if let Some(dir) = path.parent() {
                        tokio::fs::create_dir_all(dir).await?;
                    }
                    tokio::fs::write(&path, &bytes).await?;
                    Ok::<(), Box<dyn std::error::Error + Send + Sync>>(())
                }
            })
            .buffer_unordered(parallelism)
            .try_collect::<Vec<()>>()
            .await
            .map_err(|e| e.to_string())?;
        plain_best = plain_best.min(started.elapsed().as_secs_f64());
        std::fs::remove_dir_all(&target)?;

        let started = Instant::now();
        let sizes: Vec<u64> = stream::iter(chunks.iter())
            .map(|hash| {
                let key = remote.chunk_key(hash);
                let objects = remote.objects().clone();
                async move {
                    let bytes = objects.get(&key).await?.bytes().await?;
                    Ok::<u64, object_store::Error>(bytes.len() as u64)
                }
            })
            .buffer_unordered(parallelism)
            .try_collect()
            .await?;
        chunks_best = chunks_best.min(started.elapsed().as_secs_f64());
        compressed = sizes.iter().sum();

        let target = scratch.path().join(format!("round-{round}"));
        let started = Instant::now();
        remote.restore(&id, &target).await?;
        restore_best = restore_best.min(started.elapsed().as_secs_f64());
        std::fs::remove_dir_all(&target)?;
    }
    println!(
        "{}",
        serde_json::json!({
            "state_id": id.to_string(),
            "logical_bytes": local.size_bytes,
            "compressed_bytes": compressed,
            "chunks": chunks.len(),
            "upload_s": upload_s,
            "chunks_uploaded": report.chunks_uploaded,
            "files": files.len(),
            "plain_download_s": plain_best,
            "restore_s": restore_best,
            "chunk_transfer_s": chunks_best,
            "plain_mib_s": local.size_bytes as f64 / plain_best / 1048576.0,
            "restore_mib_s": local.size_bytes as f64 / restore_best / 1048576.0,
            "ratio": plain_best / restore_best,
        })
    );
    Ok(())
}

/// The regular files under `dir`, as paths relative to `root`.
fn collect_files(
    root: &std::path::Path,
    dir: &std::path::Path,
    out: &mut Vec<String>,
) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        let kind = entry.file_type()?;
        if kind.is_dir() {
            collect_files(root, &path, out)?;
        } else if kind.is_file() {
            if let Ok(rel) = path.strip_prefix(root) {
                out.push(rel.to_string_lossy().into_owned());
            }
        }
    }
    Ok(())
}
