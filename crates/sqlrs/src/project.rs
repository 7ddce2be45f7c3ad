//! The project file: `sqlrs.toml` at the repository root, found by walking up from the
//! working directory. It names the engine and named recipes (see `taidon_core::project`).

use std::path::{Path, PathBuf};

use taidon_core::project::{parse, Project, ProjectError};

/// Why the project file cannot be used (bad input: exit 2).
#[derive(Debug, thiserror::Error)]
pub(crate) enum ProjectFileError {
    #[error(transparent)]
    Parse(#[from] ProjectError),
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("no sqlrs.toml in {cwd} or above it: recipes are named there ([recipes.NAME] prepare = [\"psql\", \"-f\", \"schema.sql\"])")]
    Missing { cwd: String },
}

/// A project file found: the directory it is in (where its recipes run) and what it says.
#[derive(Debug)]
pub(crate) struct Found {
    pub(crate) root: PathBuf,
    pub(crate) project: Project,
}

/// The nearest `sqlrs.toml` at or above `cwd`, parsed; `None` if there is none.
pub(crate) fn find(cwd: &Path) -> Result<Option<Found>, ProjectFileError> {
    for dir in cwd.ancestors() {
        let file = dir.join("sqlrs.toml");
        if !file.is_file() {
            continue;
        }
        // Named as the user would reach it from here.
        let shown = match file.strip_prefix(cwd) {
            Ok(rel) => rel.display().to_string(),
            Err(_) => file.display().to_string(),
        };
        let text = std::fs::read_to_string(&file).map_err(|source| ProjectFileError::Read {
            path: shown.clone(),
            source,
        })?;
        let project = parse(&text, &shown)?;
        return Ok(Some(Found {
            root: dir.to_path_buf(),
            project,
        }));
    }
    Ok(None)
}
