//! The README tour in a real terminal: `scripts/tour.sh` types it into tmux (`nex up` in one
//! window, the tour in another) and captures the screens; this checks what a user would see —
//! the expected output, tables whose borders line up on screen, and readable errors.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Columns a character takes on a terminal (wcwidth for what nex prints): emoji and East Asian
/// wide characters take two, combining marks and variation selectors none.
fn char_width(c: char) -> usize {
    let u = c as u32;
    match u {
        0x0300..=0x036F | 0x200B..=0x200F | 0xFE00..=0xFE0F => 0,
        0x1100..=0x115F
        | 0x231A..=0x231B
        | 0x23E9..=0x23EC
        | 0x23F0
        | 0x23F3
        | 0x25FD..=0x25FE
        | 0x2614..=0x2615
        | 0x2648..=0x2653
        | 0x267F
        | 0x2693
        | 0x26A1
        | 0x26AA..=0x26AB
        | 0x26BD..=0x26BE
        | 0x26C4..=0x26C5
        | 0x26CE
        | 0x26D4
        | 0x26EA
        | 0x26F2..=0x26F3
        | 0x26F5
        | 0x26FA
        | 0x26FD
        | 0x2705
        | 0x270A..=0x270B
        | 0x2728
        | 0x274C
        | 0x274E
        | 0x2753..=0x2755
        | 0x2757
        | 0x2795..=0x2797
        | 0x27B0
        | 0x27BF
        | 0x2B1B..=0x2B1C
        | 0x2B50
        | 0x2B55
        | 0x2E80..=0xA4CF
        | 0xAC00..=0xD7A3
        | 0xF900..=0xFAFF
        | 0xFE30..=0xFE4F
        | 0xFF00..=0xFF60
        | 0xFFE0..=0xFFE6
        | 0x1F000..=0x1FAFF
        | 0x20000..=0x3FFFD => 2,
        _ => 1,
    }
}

/// The screen columns of the box-drawing borders and junctions in `line`.
fn border_columns(line: &str) -> Vec<usize> {
    let mut col = 0;
    let mut out = Vec::new();
    for c in line.chars() {
        if "╭╮╰╯├┤┬┴┼│".contains(c) {
            out.push(col);
        }
        col += char_width(c);
    }
    out
}

/// Checks every table (maximal run of lines starting with a box-drawing border): all its lines
/// end at the same screen column, and every cell border of a row sits under a junction of the
/// rule above the rows.
fn assert_tables_aligned(text: &str) -> usize {
    let lines: Vec<&str> = text.lines().map(|l| l.trim_end()).collect();
    let is_table = |l: &str| l.starts_with(['╭', '│', '├', '╰']);
    let mut tables = 0;
    let mut i = 0;
    while i < lines.len() {
        if !is_table(lines[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < lines.len() && is_table(lines[i]) {
            i += 1;
        }
        let block = &lines[start..i];
        tables += 1;
        let shown = block.join("\n");
        let right: Vec<usize> = block.iter().map(|l| *border_columns(l).last().unwrap()).collect();
        assert!(right.iter().all(|&r| r == right[0]), "a table's right border is ragged ({right:?}):\n{shown}");
        let rule = block
            .iter()
            .find(|l| l.starts_with('├') && l.contains('┼'))
            .unwrap_or_else(|| panic!("a table without a header rule:\n{shown}"));
        let junctions = border_columns(rule);
        for l in block.iter().filter(|l| l.starts_with('│')) {
            let cols = border_columns(l);
            // The title row only has its two outer borders.
            if cols.len() > 2 {
                assert_eq!(cols, junctions, "cell borders do not line up with the rule in:\n{shown}");
            }
        }
    }
    tables
}

fn nats_server() -> String {
    if let Ok(p) = std::env::var("NEX_NATS_SERVER") {
        return p;
    }
    let out = Command::new("python3")
        .args(["-c", "import sysconfig; print(sysconfig.get_path('scripts'))"])
        .output()
        .expect("running python3 to find nats-server");
    format!("{}/nats-server", String::from_utf8_lossy(&out.stdout).trim())
}

fn on_path(bin: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(bin).is_file()))
}

#[test]
fn readme_tour_in_tmux() {
    if !on_path("tmux") {
        println!("skipped: tmux not installed");
        return;
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let echo = root.join("target/x86_64-unknown-linux-musl/release/echoservice");
    assert!(
        echo.exists(),
        "{} is missing: run `make build` (cargo build --release -p echoservice --target x86_64-unknown-linux-musl)",
        echo.display()
    );
    let nex = Path::new(env!("CARGO_BIN_EXE_nex"));
    let target = nex.parent().and_then(Path::parent).expect("the target directory");
    let out = target.join("tour.txt");
    let _ = std::fs::remove_file(&out);

    let status = Command::new("bash")
        .arg(root.join("scripts/tour.sh"))
        .arg(&out)
        .current_dir(&root)
        .env("NEX", nex)
        .env("ECHO", &echo)
        .env("NEX_NATS_SERVER", nats_server())
        .status()
        .expect("running scripts/tour.sh");
    let text = std::fs::read_to_string(&out).unwrap_or_default();
    println!("{text}");
    assert!(status.success(), "scripts/tour.sh failed ({status}); transcript above");

    for want in [
        "NATS URL: nats://127.0.0.1:",
        "NATS Execution Nodes",
        "🚀 Workload 'echoservice' accepted",
        "Discovered Workloads",
        "No such workload",
        "nex is down.",
    ] {
        assert!(text.contains(want), "the tour does not show {want:?}");
    }
    let lines: Vec<&str> = text.lines().map(str::trim_end).collect();
    assert!(lines.contains(&"hello"), "`nex call svc.echo hello` did not print the reply on its own line");
    assert!(lines.contains(&"error: No such workload"), "stopping an unknown workload gives no readable error");
    let errors: Vec<&&str> = lines.iter().filter(|l| l.starts_with("error: ")).collect();
    assert!(errors.len() >= 2, "expected the two failing commands to print `error: …` lines, got {errors:?}");
    assert!(
        errors.iter().all(|l| !l.contains("Error {") && !l.contains("kind:")),
        "an error reads like a Debug dump: {errors:?}"
    );
    assert!(assert_tables_aligned(&text) >= 3, "expected the node list, probe and node info tables");
}

/// The alignment check counts screen columns, not characters: an emoji takes two.
#[test]
fn table_check_counts_screen_columns() {
    assert_eq!(assert_tables_aligned("╭───┬───╮\n│ a │ b │\n├───┼───┤\n│ 🟢│ c │\n╰───┴───╯\n"), 1);
    let ragged = "╭───┬───╮\n│ a │ b │\n├───┼───┤\n│ 🟢 │ c │\n╰───┴───╯\n";
    assert!(std::panic::catch_unwind(|| assert_tables_aligned(ragged)).is_err());
}
