//! The static-link check of sandboxed tiers, with Nex's error text: a native workload must not
//! ask for a program interpreter, since the sandbox holds no shared libraries.

use std::path::Path;

const PT_INTERP: u32 = 3;
const DYNAMIC: &str =
    "file failed static link check: native binary contains at least one dynamically linked dependency";

/// The program header table must lie within this many bytes of the file's start (it follows the
/// ELF header in every linker's output): the check never reads a whole artifact into memory.
const MAX_HEADERS: u64 = 1 << 20;

/// Ok when `path` is an ELF executable without a `PT_INTERP` program header. Reads only the
/// ELF header and the program header table.
pub fn check_static(path: &Path) -> Result<(), String> {
    use std::io::Read;
    let failed = |e: std::io::Error| format!("file failed static link check: {e}");
    let f = std::fs::File::open(path).map_err(failed)?;
    let mut head = Vec::with_capacity(64);
    f.take(64).read_to_end(&mut head).map_err(failed)?;
    let end = table_end(&head).unwrap_or(64).clamp(64, MAX_HEADERS);
    let mut bytes = Vec::new();
    std::fs::File::open(path).map_err(failed)?.take(end).read_to_end(&mut bytes).map_err(failed)?;
    check_static_bytes(&bytes)
}

/// Where the program header table of an ELF header ends, when the header says.
fn table_end(b: &[u8]) -> Option<u64> {
    if b.len() < 52 || &b[..4] != b"\x7fELF" {
        return None;
    }
    let le = b[5] == 1;
    let num = |s: &[u8]| {
        s.iter().enumerate().fold(0u64, |a, (i, x)| {
            let shift = if le { 8 * i } else { 8 * (s.len() - 1 - i) };
            a | (u64::from(*x) << shift)
        })
    };
    let (phoff, phentsize, phnum) = if b[4] == 2 {
        (num(b.get(0x20..0x28)?), num(b.get(0x36..0x38)?), num(b.get(0x38..0x3a)?))
    } else {
        (num(b.get(0x1c..0x20)?), num(b.get(0x2a..0x2c)?), num(b.get(0x2c..0x2e)?))
    };
    phoff.checked_add(phentsize.checked_mul(phnum)?)
}

/// [`check_static`] on the file's bytes.
pub fn check_static_bytes(b: &[u8]) -> Result<(), String> {
    let bad = |why: &str| Err(format!("file failed static link check: {why}"));
    if b.len() < 52 || &b[..4] != b"\x7fELF" {
        return bad("not an ELF executable");
    }
    let (is64, le) = (b[4] == 2, b[5] == 1);
    let u16_at = |o: usize| {
        b.get(o..o + 2).map(|s| if le { u16::from_le_bytes([s[0], s[1]]) } else { u16::from_be_bytes([s[0], s[1]]) })
    };
    let u32_at = |o: usize| {
        b.get(o..o + 4).map(|s| {
            let a = [s[0], s[1], s[2], s[3]];
            if le {
                u32::from_le_bytes(a)
            } else {
                u32::from_be_bytes(a)
            }
        })
    };
    let u64_at = |o: usize| {
        b.get(o..o + 8).map(|s| {
            let mut a = [0u8; 8];
            a.copy_from_slice(s);
            if le {
                u64::from_le_bytes(a)
            } else {
                u64::from_be_bytes(a)
            }
        })
    };
    let (phoff, phentsize, phnum) = if is64 {
        (u64_at(0x20), u16_at(0x36), u16_at(0x38))
    } else {
        (u32_at(0x1c).map(u64::from), u16_at(0x2a), u16_at(0x2c))
    };
    let (Some(phoff), Some(phentsize), Some(phnum)) = (phoff, phentsize, phnum) else {
        return bad("truncated ELF header");
    };
    for i in 0..phnum as u64 {
        let Some(at) = phoff.checked_add(i * phentsize as u64).and_then(|o| usize::try_from(o).ok()) else {
            return bad("program header out of range");
        };
        match u32_at(at) {
            Some(PT_INTERP) => return Err(DYNAMIC.into()),
            Some(_) => {}
            None => return bad("program header out of range"),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_agent_itself_is_dynamic_and_garbage_is_refused() {
        let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        // Test binaries are linked against the system libc here.
        assert_eq!(check_static_bytes(&me).unwrap_err(), DYNAMIC);
        assert!(check_static_bytes(b"#!/bin/sh\necho hi\n").unwrap_err().contains("not an ELF"));
        let mut truncated = me[..64].to_vec();
        truncated[0x38] = 0xff;
        assert!(check_static_bytes(&truncated).is_err());
        // From a file, reading only the headers.
        assert_eq!(check_static(&std::env::current_exe().unwrap()).unwrap_err(), DYNAMIC);
        let end = table_end(&me).unwrap();
        assert!(end < 4096, "{end}");
    }
}
