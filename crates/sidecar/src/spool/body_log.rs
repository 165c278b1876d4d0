//! Bodies of a burst, kept outside SQLite in append-only segment files.
//!
//! Why: a body SQLite holds is written twice, to the WAL and then by a checkpoint to the database
//! file, as a chain of overflow pages each framed on its own. At saturation that was most of the
//! writer's CPU. A transaction that stores many bodies (a burst) appends them to a segment here
//! instead, flushes the segment, and then commits only where each one is (`body_segment`,
//! `body_offset`, `body_length`) with its row: written once, in one `pwrite` each. That costs one more
//! flush per commit, so a commit of a body or two (a steady rate) keeps them inline, where that
//! flush would cost more than the copying it saves (see `sqlite.rs`, `LOG_BODIES_FROM`).
//!
//! A segment is `<spool>-body-<number>`, appended to only by the writer, and deleted once no row
//! refers to it ([`BodyLog::delete`], after the commit that dropped the last such row). Bytes a failed
//! transaction appended are never referenced: the segment's end is tracked here, not read from the
//! file, and a restarted writer starts a new segment.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// A segment takes no more appends once it is this long, unless told less ([`BodyLog::set_segment_bytes`]).
pub const SEGMENT_BYTES: u64 = 16 << 20;

/// Where one body is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodyRef {
    pub segment: i64,
    pub offset: i64,
    pub length: i64,
}

/// The segments beside one spool file, and the one being appended to.
pub struct BodyLog {
    spool: PathBuf,
    segment_bytes: u64,
    /// Every segment on disk, with its length.
    segments: BTreeMap<i64, u64>,
    appending: Option<Appending>,
    /// The segment last read from, kept open: a drain reads one segment after another.
    reading: Option<(i64, File)>,
}

struct Appending {
    segment: i64,
    file: File,
    /// Whether bytes were appended since the last flush.
    unflushed: bool,
    /// Whether the file was created since the last flush: then its directory entry is flushed too.
    created: bool,
}

/// What follows the spool's file name in a segment's: `<spool>-body-<number>`.
const SEGMENT_INFIX: &str = "-body-";

fn folder(spool: &Path) -> &Path {
    spool.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."))
}

impl BodyLog {
    /// Finds the segments beside the spool at `spool`. Appends will go to a new one.
    pub fn open(spool: &Path) -> std::io::Result<BodyLog> {
        let mut segments = BTreeMap::new();
        for (path, segment) in segment_files(spool)? {
            segments.insert(segment, std::fs::metadata(&path)?.len());
        }
        Ok(BodyLog {
            spool: spool.to_path_buf(),
            segment_bytes: SEGMENT_BYTES,
            segments,
            appending: None,
            reading: None,
        })
    }

    /// How long a segment grows before the next append starts another: a segment's bytes count
    /// against `maxBytes` until its last body goes, so a small spool needs small segments.
    pub fn set_segment_bytes(&mut self, bytes: u64) {
        self.segment_bytes = bytes.min(SEGMENT_BYTES);
    }

    /// The file of `segment`.
    pub fn path(&self, segment: i64) -> PathBuf {
        let name = self.spool.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        folder(&self.spool).join(format!("{name}{SEGMENT_INFIX}{segment:010}"))
    }

    /// Appends `body` to the current segment (starting a new one when there is none or it is full).
    /// It is durable only after [`BodyLog::flush`].
    pub fn append(&mut self, body: &[u8]) -> std::io::Result<BodyRef> {
        let full = |a: &Appending| self.segments.get(&a.segment).is_none_or(|len| *len >= self.segment_bytes);
        if self.appending.as_ref().is_none_or(full) {
            self.start_segment()?;
        }
        let Some(appending) = self.appending.as_mut() else { unreachable!("a segment was just started") };
        let offset = self.segments.get(&appending.segment).copied().unwrap_or(0);
        if let Err(error) = appending.file.write_all_at(body, offset) {
            // How much landed is unknown: the next append starts a new segment.
            self.appending = None;
            return Err(error);
        }
        appending.unflushed = true;
        self.segments.insert(appending.segment, offset + body.len() as u64);
        Ok(BodyRef { segment: appending.segment, offset: offset as i64, length: body.len() as i64 })
    }

    fn start_segment(&mut self) -> std::io::Result<()> {
        // Never appended to again: a previous segment may end in bytes a failed transaction left.
        let segment = self.segments.keys().next_back().map_or(1, |last| last + 1);
        let file = OpenOptions::new().read(true).write(true).create_new(true).open(self.path(segment))?;
        self.segments.insert(segment, 0);
        self.appending = Some(Appending { segment, file, unflushed: false, created: true });
        Ok(())
    }

    /// Makes what was appended durable: before the transaction that refers to it commits.
    pub fn flush(&mut self) -> std::io::Result<()> {
        let Some(appending) = self.appending.as_mut() else { return Ok(()) };
        if appending.unflushed {
            appending.file.sync_data()?;
            appending.unflushed = false;
        }
        if appending.created {
            File::open(folder(&self.spool))?.sync_all()?;
            appending.created = false;
        }
        Ok(())
    }

    /// Reads one body back.
    pub fn read(&mut self, at: BodyRef) -> std::io::Result<Vec<u8>> {
        let (Ok(offset), Ok(length)) = (u64::try_from(at.offset), usize::try_from(at.length)) else {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "a negative body offset or length"));
        };
        if self.reading.as_ref().is_none_or(|(segment, _)| *segment != at.segment) {
            self.reading = Some((at.segment, File::open(self.path(at.segment))?));
        }
        let Some((_, file)) = self.reading.as_ref() else { unreachable!("just opened") };
        let mut body = vec![0; length];
        file.read_exact_at(&mut body, offset)?;
        Ok(body)
    }

    /// The segment being appended to.
    pub fn appending(&self) -> Option<i64> {
        self.appending.as_ref().map(|a| a.segment)
    }

    /// Every segment on disk with its length.
    pub fn segments(&self) -> impl Iterator<Item = (i64, u64)> + '_ {
        self.segments.iter().map(|(segment, len)| (*segment, *len))
    }

    /// Bytes of every segment on disk.
    pub fn bytes(&self) -> u64 {
        self.segments.values().sum()
    }

    /// Deletes a segment no row refers to; when it is the one being appended to, the next append
    /// starts another.
    pub fn delete(&mut self, segment: i64) -> std::io::Result<()> {
        if self.appending() == Some(segment) {
            self.appending = None;
        }
        if self.reading.as_ref().is_some_and(|(open, _)| *open == segment) {
            self.reading = None;
        }
        match std::fs::remove_file(self.path(segment)) {
            Err(error) if error.kind() != std::io::ErrorKind::NotFound => return Err(error),
            _ => {}
        }
        self.segments.remove(&segment);
        Ok(())
    }
}

/// The segment files beside the spool at `spool`, with their numbers.
pub fn segment_files(spool: &Path) -> std::io::Result<Vec<(PathBuf, i64)>> {
    let mut found: Vec<(PathBuf, i64)> = files_beside(spool, SEGMENT_INFIX)?
        .into_iter()
        .filter_map(|(path, number)| Some((path, number.parse().ok()?)))
        .collect();
    found.sort_by_key(|(_, segment)| *segment);
    Ok(found)
}

/// The files beside the spool at `spool` named `<spool><infix><rest>`, each with its `rest` (none
/// when the folder does not exist yet): the spool's companions, body segments and set-aside copies.
pub fn files_beside(spool: &Path, infix: &str) -> std::io::Result<Vec<(PathBuf, String)>> {
    let Some(name) = spool.file_name().and_then(|n| n.to_str()) else { return Ok(Vec::new()) };
    let prefix = format!("{name}{infix}");
    let entries = match std::fs::read_dir(folder(spool)) {
        Ok(entries) => entries,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(error) => return Err(error),
    };
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry?;
        if let Some(rest) = entry.file_name().to_str().and_then(|n| n.strip_prefix(&prefix)) {
            found.push((entry.path(), rest.to_string()));
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_come_back_from_segments_and_a_full_segment_takes_no_more() {
        let dir = tempfile::tempdir().unwrap();
        let spool = dir.path().join("spool.db");
        let mut log = BodyLog::open(&spool).unwrap();
        let first = log.append(b"first").unwrap();
        let big = vec![7u8; SEGMENT_BYTES as usize];
        let second = log.append(&big).unwrap();
        assert_eq!((first.segment, first.offset, second.segment, second.offset), (1, 0, 1, 5), "one segment so far");
        let third = log.append(b"third").unwrap();
        assert_eq!((third.segment, third.offset), (2, 0), "the first is past SEGMENT_BYTES");
        log.flush().unwrap();
        assert_eq!(log.read(first).unwrap(), b"first");
        assert_eq!(log.read(second).unwrap(), big);
        assert_eq!(log.read(third).unwrap(), b"third");
        assert_eq!(log.bytes(), SEGMENT_BYTES + 10);
        assert!(log.path(1).ends_with("spool.db-body-0000000001"), "{}", log.path(1).display());
    }

    #[test]
    fn a_reopened_log_appends_to_a_new_segment_and_deletes_only_old_ones() {
        let dir = tempfile::tempdir().unwrap();
        let spool = dir.path().join("spool.db");
        let mut log = BodyLog::open(&spool).unwrap();
        let kept = log.append(b"kept").unwrap();
        log.flush().unwrap();
        drop(log);
        let mut log = BodyLog::open(&spool).unwrap();
        assert_eq!(log.segments().collect::<Vec<_>>(), [(1, 4)]);
        let next = log.append(b"next").unwrap();
        assert_eq!(next.segment, 2, "bytes after a crash's last commit are never appended to");
        assert_eq!(log.read(kept).unwrap(), b"kept");
        log.set_segment_bytes(4);
        let own = log.append(b"own").unwrap();
        assert_eq!(own.segment, 3, "segment 2 is past the smaller size");
        log.delete(3).unwrap();
        assert_eq!(log.append(b"again").unwrap().segment, 3, "a deleted segment is not appended to");
        log.delete(2).unwrap();
        log.delete(1).unwrap();
        assert!(!log.path(1).exists());
        assert_eq!(log.bytes(), 5);
        assert!(log.read(kept).is_err(), "a deleted segment is gone, also when it was open for reading");
    }
}
