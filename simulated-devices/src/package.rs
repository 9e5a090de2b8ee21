//! The application package format: a gzip-compressed tar holding the app's files and
//! `manifest.json` (name, version, optional self-test command) at its root, named
//! `<name>-<version>.tar.gz`; and `latest.json`, which sits beside the packages on the FTP server
//! and names the newest one with its sha256 and size.
//!
//! Packages are built reproducibly (entries sorted, timestamps and owners zeroed) so the same
//! folder always gives the same sha256.

use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use flate2::Compression;
use flate2::write::GzEncoder;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The manifest's file name inside a package.
pub const MANIFEST_FILE: &str = "manifest.json";
/// The file on the FTP server naming the newest package.
pub const LATEST_FILE: &str = "latest.json";

/// What a package says about itself (`manifest.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    /// The application's name.
    pub name: String,
    /// The version this package installs.
    pub version: String,
    /// A shell command run in the unpacked release directory before it becomes `current`; a
    /// non-zero exit rolls the install back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub self_test: Option<String>,
}

/// A package as published: where it is on the server and how to check it (`latest.json`, and the
/// body of an update notice).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Release {
    /// The application's name.
    pub name: String,
    /// The version.
    pub version: String,
    /// The package's path on the FTP server, relative to its root.
    pub file: String,
    /// SHA-256 of the package file, lower-case hex.
    pub sha256: String,
    /// Size of the package file in bytes.
    pub size: u64,
}

/// Errors building, publishing or reading packages.
#[derive(Debug, thiserror::Error)]
pub enum PackageError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// The manifest is missing, malformed or incomplete.
    #[error("manifest: {0}")]
    Manifest(String),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> PackageError + '_ {
    move |source| PackageError::Io { path: path.to_path_buf(), source }
}

impl Manifest {
    /// Checks that name and version are usable in a file name.
    pub fn validate(&self) -> Result<(), PackageError> {
        for (what, v) in [("name", &self.name), ("version", &self.version)] {
            let ok = !v.is_empty()
                && v.len() <= 64
                && v.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '+'));
            if !ok {
                return Err(PackageError::Manifest(format!(
                    "{what} '{v}' must be 1-64 characters of A-Z a-z 0-9 . - _ +"
                )));
            }
        }
        Ok(())
    }

    /// The package's file name: `<name>-<version>.tar.gz`.
    pub fn file_name(&self) -> String {
        format!("{}-{}.tar.gz", self.name, self.version)
    }
}

/// Lower-case hex SHA-256 of a file, and its size.
pub fn sha256_file(path: &Path) -> Result<(String, u64), PackageError> {
    let mut f = fs::File::open(path).map_err(io_err(path))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(io_err(path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    Ok((hex(&hasher.finalize()), size))
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Every regular file under `dir`, as paths relative to it, sorted.
fn files_under(dir: &Path) -> Result<Vec<PathBuf>, PackageError> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let abs = dir.join(&rel);
        for entry in fs::read_dir(&abs).map_err(io_err(&abs))? {
            let entry = entry.map_err(io_err(&abs))?;
            let ty = entry.file_type().map_err(io_err(&entry.path()))?;
            let child = rel.join(entry.file_name());
            if ty.is_dir() {
                stack.push(child);
            } else if ty.is_file() {
                out.push(child);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Builds a package from the app files in `src_dir` into `out_dir`. The manifest is `manifest`
/// when given, otherwise `src_dir/manifest.json`. Returns the package as it would be published.
pub fn build_package(
    src_dir: &Path,
    manifest: Option<&Manifest>,
    out_dir: &Path,
) -> Result<(Manifest, PathBuf, Release), PackageError> {
    let manifest = match manifest {
        Some(m) => m.clone(),
        None => {
            let p = src_dir.join(MANIFEST_FILE);
            let text = fs::read(&p).map_err(|e| {
                PackageError::Manifest(format!(
                    "{} cannot be read ({e}); add one or give --name and --version",
                    p.display()
                ))
            })?;
            serde_json::from_slice(&text).map_err(|e| {
                PackageError::Manifest(format!("{} is not a valid manifest: {e}", p.display()))
            })?
        }
    };
    manifest.validate()?;
    fs::create_dir_all(out_dir).map_err(io_err(out_dir))?;
    let path = out_dir.join(manifest.file_name());
    let tmp = out_dir.join(format!(".{}.partial", manifest.file_name()));
    write_tar_gz(src_dir, &manifest, &tmp)?;
    fs::rename(&tmp, &path).map_err(io_err(&path))?;
    let (sha256, size) = sha256_file(&path)?;
    let release = Release {
        name: manifest.name.clone(),
        version: manifest.version.clone(),
        file: manifest.file_name(),
        sha256,
        size,
    };
    Ok((manifest, path, release))
}

fn write_tar_gz(src_dir: &Path, manifest: &Manifest, dest: &Path) -> Result<(), PackageError> {
    let file = fs::File::create(dest).map_err(io_err(dest))?;
    let mut tar = tar::Builder::new(GzEncoder::new(file, Compression::default()));
    let append = |tar: &mut tar::Builder<GzEncoder<fs::File>>, name: &Path, data: &[u8], mode: u32| {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(mode);
        header.set_mtime(0);
        header.set_uid(0);
        header.set_gid(0);
        header.set_entry_type(tar::EntryType::Regular);
        tar.append_data(&mut header, name, data).map_err(io_err(dest))
    };
    let manifest_json =
        serde_json::to_vec_pretty(manifest).map_err(|e| PackageError::Manifest(e.to_string()))?;
    append(&mut tar, Path::new(MANIFEST_FILE), &manifest_json, 0o644)?;
    for rel in files_under(src_dir)? {
        if rel == Path::new(MANIFEST_FILE) {
            continue;
        }
        let abs = src_dir.join(&rel);
        let data = fs::read(&abs).map_err(io_err(&abs))?;
        append(&mut tar, &rel, &data, file_mode(&abs))?;
    }
    let gz = tar.into_inner().map_err(io_err(dest))?;
    let mut file = gz.finish().map_err(io_err(dest))?;
    file.flush().map_err(io_err(dest))?;
    file.sync_all().map_err(io_err(dest))
}

#[cfg(unix)]
fn file_mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    let exec = fs::metadata(path).map(|m| m.permissions().mode() & 0o111 != 0).unwrap_or(false);
    if exec { 0o755 } else { 0o644 }
}

#[cfg(not(unix))]
fn file_mode(_path: &Path) -> u32 {
    0o644
}

/// Builds a package from `src_dir` straight into the FTP server's `packages_dir` and points
/// `latest.json` at it (written to a temporary file and renamed, so readers never see half).
pub fn publish(
    src_dir: &Path,
    manifest: Option<&Manifest>,
    packages_dir: &Path,
) -> Result<Release, PackageError> {
    let (_, _, release) = build_package(src_dir, manifest, packages_dir)?;
    write_latest(packages_dir, &release)?;
    Ok(release)
}

/// Writes `latest.json` in `packages_dir` atomically.
pub fn write_latest(packages_dir: &Path, release: &Release) -> Result<(), PackageError> {
    let path = packages_dir.join(LATEST_FILE);
    let tmp = packages_dir.join(format!(".{LATEST_FILE}.partial"));
    let body = serde_json::to_vec_pretty(release).map_err(|e| PackageError::Manifest(e.to_string()))?;
    fs::write(&tmp, body).map_err(io_err(&tmp))?;
    fs::rename(&tmp, &path).map_err(io_err(&path))
}

/// Reads the manifest from an unpacked package directory.
pub fn read_manifest(dir: &Path) -> Result<Manifest, PackageError> {
    let p = dir.join(MANIFEST_FILE);
    let text = fs::read(&p).map_err(io_err(&p))?;
    let m: Manifest = serde_json::from_slice(&text)
        .map_err(|e| PackageError::Manifest(format!("{} is not a valid manifest: {e}", p.display())))?;
    m.validate()?;
    Ok(m)
}

/// Unpacks the package at `archive` into `dest` (created), refusing entries that would land
/// outside it, and returns its manifest.
pub fn unpack(archive: &Path, dest: &Path) -> Result<Manifest, PackageError> {
    fs::create_dir_all(dest).map_err(io_err(dest))?;
    let file = fs::File::open(archive).map_err(io_err(archive))?;
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(file));
    tar.set_preserve_permissions(true);
    for entry in tar.entries().map_err(io_err(archive))? {
        let mut entry = entry.map_err(io_err(archive))?;
        // `unpack_in` refuses absolute paths and `..` components.
        let inside = entry.unpack_in(dest).map_err(io_err(archive))?;
        if !inside {
            return Err(PackageError::Manifest(format!(
                "{} holds an entry outside the package root",
                archive.display()
            )));
        }
    }
    read_manifest(dest)
}

/// Reads the manifest of a package held in memory (`archive` is the `.tar.gz` file's bytes),
/// checking every entry as [`unpack`] does (no absolute paths, no `..`) without writing anything.
pub fn manifest_in_archive(archive: &[u8]) -> Result<Manifest, PackageError> {
    let bad = |what: String| PackageError::Manifest(format!("the package {what}"));
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(archive));
    let mut manifest = None;
    for entry in tar.entries().map_err(|e| bad(format!("is not a tar.gz: {e}")))? {
        let mut entry = entry.map_err(|e| bad(format!("is damaged: {e}")))?;
        let path = entry.path().map_err(|e| bad(format!("holds a bad path: {e}")))?.into_owned();
        let inside = path
            .components()
            .all(|c| matches!(c, std::path::Component::Normal(_) | std::path::Component::CurDir));
        if !inside {
            return Err(bad(format!("holds an entry outside the package root: {}", path.display())));
        }
        if path == Path::new(MANIFEST_FILE) {
            let mut text = Vec::new();
            entry.read_to_end(&mut text).map_err(|e| bad(format!("is damaged: {e}")))?;
            let m: Manifest = serde_json::from_slice(&text)
                .map_err(|e| bad(format!("has an invalid {MANIFEST_FILE}: {e}")))?;
            m.validate()?;
            manifest = Some(m);
        }
    }
    manifest.ok_or_else(|| bad(format!("has no {MANIFEST_FILE}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn app_dir(root: &Path) -> PathBuf {
        let src = root.join("app");
        fs::create_dir_all(src.join("bin")).unwrap();
        fs::write(src.join("bin/run.sh"), "#!/bin/sh\necho hi\n").unwrap();
        fs::write(src.join("config.txt"), "x=1\n").unwrap();
        src
    }

    #[test]
    fn build_is_reproducible_and_unpacks_with_manifest() {
        let tmp = tempfile::tempdir().unwrap();
        let src = app_dir(tmp.path());
        let m = Manifest { name: "fridge".into(), version: "2.0.0".into(), self_test: Some("true".into()) };
        let (_, path, r1) = build_package(&src, Some(&m), &tmp.path().join("out1")).unwrap();
        let (_, _, r2) = build_package(&src, Some(&m), &tmp.path().join("out2")).unwrap();
        assert_eq!(r1, r2, "same folder, same bytes");
        assert_eq!(r1.file, "fridge-2.0.0.tar.gz");
        assert_eq!(r1.size, fs::metadata(&path).unwrap().len());
        assert_eq!(r1.sha256.len(), 64);
        let dest = tmp.path().join("unpacked");
        assert_eq!(unpack(&path, &dest).unwrap(), m);
        assert_eq!(manifest_in_archive(&fs::read(&path).unwrap()).unwrap(), m, "read in memory too");
        assert!(manifest_in_archive(b"not a package").is_err());
        assert_eq!(fs::read_to_string(dest.join("config.txt")).unwrap(), "x=1\n");
        assert!(dest.join("bin/run.sh").exists());
    }

    #[test]
    fn manifest_comes_from_the_folder_when_not_given() {
        let tmp = tempfile::tempdir().unwrap();
        let src = app_dir(tmp.path());
        let err = build_package(&src, None, &tmp.path().join("out")).unwrap_err();
        assert!(err.to_string().contains("--name and --version"), "{err}");
        fs::write(src.join(MANIFEST_FILE), r#"{"name":"fridge","version":"1.0"}"#).unwrap();
        let (m, _, _) = build_package(&src, None, &tmp.path().join("out")).unwrap();
        assert_eq!(m.version, "1.0");
        assert_eq!(m.self_test, None);
    }

    #[test]
    fn bad_names_are_refused() {
        let m = Manifest { name: "../evil".into(), version: "1".into(), self_test: None };
        assert!(m.validate().is_err());
        let m = Manifest { name: "ok".into(), version: "".into(), self_test: None };
        assert!(m.validate().is_err());
    }

    #[test]
    fn publish_updates_latest_json() {
        let tmp = tempfile::tempdir().unwrap();
        let src = app_dir(tmp.path());
        let pkgs = tmp.path().join("packages");
        let m = Manifest { name: "fridge".into(), version: "3".into(), self_test: None };
        let r = publish(&src, Some(&m), &pkgs).unwrap();
        let latest: Release = serde_json::from_slice(&fs::read(pkgs.join(LATEST_FILE)).unwrap()).unwrap();
        assert_eq!(latest, r);
        assert_eq!(sha256_file(&pkgs.join(&r.file)).unwrap(), (r.sha256.clone(), r.size));
    }
}
