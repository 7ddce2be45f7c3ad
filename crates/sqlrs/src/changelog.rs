//! A Liquibase changelog's closure as it travels to the controller: every file the master
//! pulls in, hashed by content, each a blob, laid out relative to the search root (the working
//! directory, as Liquibase's own default search path).

use std::collections::BTreeMap;
use std::path::Path;

use taidon_api::LiquibaseRequest;
use taidon_core::changelog::{closure, ChangelogError};
use taidon_core::identity::content_sha256;
use taidon_core::plan::Included;

use crate::args::LbArgs;
use crate::client::BlobSource;

/// The request for `lb`'s changelog under `root`, and its blobs by sha256.
pub(crate) fn collect(
    root: &Path,
    lb: &LbArgs,
) -> Result<(LiquibaseRequest, BTreeMap<String, BlobSource>), ChangelogError> {
    let mut read = |rel: &str| std::fs::read(root.join(rel));
    let mut list_dir = |rel: &str| crate::cmd_inputs::walk(&root.join(rel));
    let files = closure(&lb.changelog, &mut read, &mut list_dir)?;
    let changelog = files
        .first()
        .map_or_else(|| lb.changelog.clone(), |f| f.path.clone());
    let mut blobs = BTreeMap::new();
    let mut included = Vec::with_capacity(files.len());
    for f in files {
        let sha256 = content_sha256(&f.content);
        included.push(Included {
            path: f.path,
            sha256: sha256.clone(),
        });
        blobs.insert(sha256, BlobSource::Bytes(f.content));
    }
    Ok((
        LiquibaseRequest {
            changelog,
            args: lb.args.clone(),
            files: included,
        },
        blobs,
    ))
}
