//! Compiles the CUDA kernels under cuda/kernels into fatbins embedded in the library, and the
//! host side of the tile plan (cuda/host) into a small static library for the CPU model.
//!
//! nvcc is looked up in NVCC, CUDA_HOME/bin, CUDA_PATH/bin, PATH, /usr/local/cuda/bin and the
//! project's own .venv-cuda (made by scripts/install-toolchain.sh). Targets default to SASS for
//! sm_80 and sm_90a plus compute_80 PTX; LONGFLASH_CUDA_ARCHS overrides them with a comma list
//! such as `80,86,90a` (SASS for each, PTX for the first). Kernels named `*_sm90_*` use Hopper-only
//! instructions (wgmma, setmaxnreg) and are built as sm_90a SASS alone, when 90a is a target.

use std::env;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let out = PathBuf::from(env::var("OUT_DIR").unwrap());
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=cuda");
    for var in [
        "NVCC",
        "CUDA_HOME",
        "CUDA_PATH",
        "LONGFLASH_CUDA_ARCHS",
        "NVCC_FLAGS",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }

    cc::Build::new()
        .file(root.join("cuda/host/plan.c"))
        .include(root.join("cuda/include"))
        .warnings(true)
        .compile("longflash_host");

    let nvcc = match find_nvcc(&root) {
        Some(p) => p,
        None => fail(
            "longflash: no CUDA compiler (nvcc) found.\n\
             Looked in $NVCC, $CUDA_HOME/bin, $CUDA_PATH/bin, $PATH, /usr/local/cuda/bin and ./.venv-cuda.\n\
             Install the CUDA toolkit (12.x or 13.x), or run `scripts/install-toolchain.sh`, which\n\
             installs nvcc 13.0 from PyPI into .venv-cuda (no GPU needed), or set NVCC=/path/to/nvcc.",
        ),
    };

    let archs = env::var("LONGFLASH_CUDA_ARCHS").unwrap_or_else(|_| "80,90a".to_string());
    let archs: Vec<String> = archs
        .split(',')
        .map(|a| a.trim().trim_start_matches("sm_").to_string())
        .filter(|a| !a.is_empty())
        .collect();
    if archs.is_empty()
        || archs
            .iter()
            .any(|a| !a.chars().all(|c| c.is_ascii_alphanumeric()))
    {
        fail("longflash: LONGFLASH_CUDA_ARCHS must be a comma list such as `80,90a`");
    }
    let mut gencode = Vec::new();
    for a in &archs {
        gencode.push(format!("-gencode=arch=compute_{a},code=sm_{a}"));
    }
    gencode.push(format!(
        "-gencode=arch=compute_{0},code=compute_{0}",
        archs[0]
    ));

    let hopper = archs.iter().any(|a| a == "90a");
    let hopper_gencode = vec!["-gencode=arch=compute_90a,code=sm_90a".to_string()];
    let is_hopper_only = |p: &Path| {
        p.file_stem()
            .is_some_and(|s| s.to_string_lossy().contains("_sm90_"))
    };
    let mut sources: Vec<PathBuf> = std::fs::read_dir(root.join("cuda/kernels"))
        .unwrap_or_else(|e| fail(&format!("longflash: cannot read cuda/kernels: {e}")))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "cu"))
        .filter(|p| hopper || !is_hopper_only(p))
        .collect();
    sources.sort();

    let extra: Vec<String> = env::var("NVCC_FLAGS")
        .map(|f| f.split_whitespace().map(String::from).collect())
        .unwrap_or_default();
    let jobs = std::thread::available_parallelism().map_or(2, |n| n.get());
    let mut results: Vec<(String, Result<PathBuf, String>)> = Vec::new();
    for chunk in sources.chunks(jobs) {
        let handles: Vec<_> = chunk
            .iter()
            .map(|src| {
                let (nvcc, root, out, extra) =
                    (nvcc.clone(), root.clone(), out.clone(), extra.clone());
                let gencode = if is_hopper_only(src) {
                    hopper_gencode.clone()
                } else {
                    gencode.clone()
                };
                let src = src.clone();
                std::thread::spawn(move || compile(&nvcc, &root, &out, &gencode, &extra, &src))
            })
            .collect();
        for (src, h) in chunk.iter().zip(handles) {
            let stem = src.file_stem().unwrap().to_string_lossy().into_owned();
            results.push((
                stem,
                h.join()
                    .unwrap_or_else(|_| Err("nvcc thread panicked".into())),
            ));
        }
    }

    let mut table = String::from(
        "/// Fatbins compiled from cuda/kernels, by source file stem.\npub(crate) static FATBINS: &[(&str, &[u8])] = &[\n",
    );
    for (stem, r) in &results {
        match r {
            Ok(path) => writeln!(
                table,
                "    ({stem:?}, include_bytes!({:?})),",
                path.display()
            )
            .unwrap(),
            Err(e) => fail(&format!(
                "longflash: nvcc failed on cuda/kernels/{stem}.cu:\n{e}"
            )),
        }
    }
    table.push_str("];\n");
    writeln!(
        table,
        "/// Targets the fatbins were built for.\npub(crate) const ARCHS: &str = {:?};",
        archs.join(",")
    )
    .unwrap();
    std::fs::write(out.join("kernels.rs"), table).unwrap();
}

fn compile(
    nvcc: &Path,
    root: &Path,
    out: &Path,
    gencode: &[String],
    extra: &[String],
    src: &Path,
) -> Result<PathBuf, String> {
    let stem = src.file_stem().unwrap().to_string_lossy();
    let dst = out.join(format!("{stem}.fatbin"));
    let output = Command::new(nvcc)
        .arg("-fatbin")
        .args([
            "-std=c++17",
            "-O3",
            "--expt-relaxed-constexpr",
            "-Xptxas=-v",
        ])
        .arg(format!("-I{}", root.join("cuda/include").display()))
        .args(gencode)
        .args(extra)
        .arg("-o")
        .arg(&dst)
        .arg(src)
        .output()
        .map_err(|e| format!("could not run {}: {e}", nvcc.display()))?;
    let log = String::from_utf8_lossy(&output.stderr).into_owned();
    std::fs::write(out.join(format!("{stem}.ptxas.log")), &log).ok();
    if !output.status.success() {
        return Err(log);
    }
    // A spill in the hot loop costs far more than it looks, and so do wgmmas that ptxas had to
    // serialize (C7512 and its kin): say so at build time.
    for line in log.lines().filter(|l| {
        (l.contains("spill stores") && !l.contains(" 0 bytes spill stores"))
            || l.contains("Potential Performance Loss")
    }) {
        println!("cargo:warning={stem}: {}", line.trim());
    }
    Ok(dst)
}

fn find_nvcc(root: &Path) -> Option<PathBuf> {
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(p) = env::var_os("NVCC") {
        candidates.push(p.into());
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(p) = env::var_os(var) {
            candidates.push(Path::new(&p).join("bin/nvcc"));
        }
    }
    if let Some(path) = env::var_os("PATH") {
        candidates.extend(env::split_paths(&path).map(|d| d.join("nvcc")));
    }
    candidates.push("/usr/local/cuda/bin/nvcc".into());
    if let Ok(rd) = std::fs::read_dir(root.join(".venv-cuda/lib")) {
        for e in rd.flatten() {
            candidates.push(e.path().join("site-packages/nvidia/cu13/bin/nvcc"));
        }
    }
    candidates.into_iter().find(|p| p.is_file())
}

fn fail(msg: &str) -> ! {
    eprintln!("{msg}");
    std::process::exit(1)
}
