//! A model's profile: for every length level, the mean over its calibration samples of
//! every query head's influence sums ([`HeadSums`]), and the dense response loss. Saved
//! as safetensors (f64 tensors `n{N}.total`/`n{N}.sink` [layers, heads],
//! `n{N}.token` [layers, heads, N], `n{N}.block` [layers, heads, N/64]; metadata: the
//! model, its attention shape, the sink, lengths and sample counts). Version 2 adds the
//! influence of each window with a row's masked entries taken together (`n{N}.rows`
//! [layers, heads, N/64 + 1]) and the needle attention of the copy steps
//! (`n{N}.needle.total` ... `n{N}.needle.block`, the influence's shapes); a version 1
//! file reads with neither. Version 3 adds the influence |E| of those needle entries
//! (`n{N}.needle_e.*`); a version 2 file reads without it. A run keeps each finished
//! sample in `<output>.parts/` and resumes from there.

use super::calib::{write_atomic, CalibSample, CalibSet};
use super::influence::HeadSums;
use crate::llama::Llama;
use crate::{Error, Result};
use moac::plan::ModelShape;
use safetensors::tensor::{Dtype as StDtype, TensorView};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub const FORMAT: &str = "moac-profile";

/// The profile of one length level.
#[derive(Debug, Clone, PartialEq)]
pub struct Level {
    pub length: usize,
    pub samples: usize,
    /// Mean dense response loss of the samples.
    pub loss: f64,
    /// [layer][query head], the mean over samples.
    pub heads: Vec<Vec<HeadSums>>,
    /// [layer][query head]: the mean over samples of the needle attention at the copy
    /// steps (`influence::needle_sums`); none in profiles of version 1.
    pub needle: Option<Vec<Vec<HeadSums>>>,
    /// [layer][query head]: the mean over samples of the needle entries' influence at
    /// the copy steps; none in profiles before version 3.
    pub needle_influence: Option<Vec<Vec<HeadSums>>>,
}

/// A whole profile.
#[derive(Debug, Clone, PartialEq)]
pub struct Profile {
    /// The model's file or folder name.
    pub model: String,
    pub shape: ModelShape,
    pub sink: u64,
    /// Ascending by length.
    pub levels: Vec<Level>,
}

fn f64_bytes(v: impl Iterator<Item = f64>) -> Vec<u8> {
    v.flat_map(|x| x.to_le_bytes()).collect()
}

fn st_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Format {
        path: path.to_path_buf(),
        message: format!("not a readable moac profile: {e}"),
    }
}

impl Profile {
    /// The lengths profiled, ascending.
    pub fn lengths(&self) -> Vec<usize> {
        self.levels.iter().map(|l| l.length).collect()
    }

    /// The serialized file.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let (nl, nh) = (self.shape.num_layers, self.shape.num_query_heads);
        let mut buffers: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
        let mut push = |p: &str, n: usize, sums: &[Vec<HeadSums>], rows: bool| {
            let all = || sums.iter().flatten();
            buffers.push((
                format!("{p}.total"),
                vec![nl, nh],
                f64_bytes(all().map(|h| h.total)),
            ));
            buffers.push((
                format!("{p}.sink"),
                vec![nl, nh],
                f64_bytes(all().map(|h| h.sink)),
            ));
            buffers.push((
                format!("{p}.token"),
                vec![nl, nh, n],
                f64_bytes(all().flat_map(|h| h.token.iter().copied())),
            ));
            buffers.push((
                format!("{p}.block"),
                vec![nl, nh, n.div_ceil(64)],
                f64_bytes(all().flat_map(|h| h.block.iter().copied())),
            ));
            if rows {
                buffers.push((
                    format!("{p}.rows"),
                    vec![nl, nh, n.div_ceil(64) + 1],
                    f64_bytes(all().flat_map(|h| h.rows.iter().copied())),
                ));
            }
        };
        for lv in &self.levels {
            let n = lv.length;
            push(&format!("n{n}"), n, &lv.heads, lv.needle.is_some());
            if let Some(nd) = &lv.needle {
                push(&format!("n{n}.needle"), n, nd, false);
                if let Some(ne) = &lv.needle_influence {
                    push(&format!("n{n}.needle_e"), n, ne, false);
                }
            }
        }
        let all = |f: &dyn Fn(&Level) -> bool| self.levels.iter().all(f);
        let version = if all(&|l| l.needle.is_some() && l.needle_influence.is_some()) {
            "3"
        } else if all(&|l| l.needle.is_some()) {
            "2"
        } else {
            "1"
        };
        let views: Vec<(String, TensorView<'_>)> = buffers
            .iter()
            .map(|(name, shape, data)| {
                TensorView::new(StDtype::F64, shape.clone(), data)
                    .map(|v| (name.clone(), v))
                    .map_err(|e| Error::Usage(format!("profile tensor {name}: {e}")))
            })
            .collect::<Result<_>>()?;
        let join =
            |f: &dyn Fn(&Level) -> String| self.levels.iter().map(f).collect::<Vec<_>>().join(",");
        let meta: HashMap<String, String> = [
            ("format", FORMAT.to_string()),
            ("version", version.into()),
            ("model", self.model.clone()),
            (
                "shape",
                serde_json::to_string(&self.shape).map_err(|e| Error::Usage(e.to_string()))?,
            ),
            ("sink", self.sink.to_string()),
            ("lengths", join(&|l| l.length.to_string())),
            ("samples", join(&|l| l.samples.to_string())),
            ("loss", join(&|l| format!("{:e}", l.loss))),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        safetensors::serialize(views, Some(meta)).map_err(|e| Error::Usage(format!("profile: {e}")))
    }

    /// Writes the file whole (temporary file, then rename).
    pub fn write(&self, path: &Path) -> Result<()> {
        write_atomic(path, &self.to_bytes()?)
    }

    /// Reads a profile; errors name the file and what is wrong.
    pub fn read(path: &Path) -> Result<Profile> {
        let bytes = std::fs::read(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Profile::from_bytes(path, &bytes)
    }

    fn from_bytes(path: &Path, bytes: &[u8]) -> Result<Profile> {
        let (_, meta) =
            safetensors::SafeTensors::read_metadata(bytes).map_err(|e| st_err(path, e))?;
        let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| st_err(path, e))?;
        let md = meta.metadata().clone().unwrap_or_default();
        let get = |k: &str| {
            md.get(k)
                .cloned()
                .ok_or_else(|| st_err(path, format!("metadata {k} missing")))
        };
        if get("format")? != FORMAT {
            return Err(st_err(path, "metadata format is not moac-profile"));
        }
        let shape: ModelShape = serde_json::from_str(&get("shape")?)
            .map_err(|e| st_err(path, format!("shape: {e}")))?;
        let num = |s: &str, what: &str| -> Result<Vec<f64>> {
            s.split(',')
                .map(|x| {
                    x.trim()
                        .parse::<f64>()
                        .map_err(|e| st_err(path, format!("{what}: {e}")))
                })
                .collect()
        };
        let lengths = num(&get("lengths")?, "lengths")?;
        let samples = num(&get("samples")?, "samples")?;
        let losses = num(&get("loss")?, "loss")?;
        let sink: u64 = get("sink")?
            .parse()
            .map_err(|e| st_err(path, format!("sink: {e}")))?;
        if lengths.len() != samples.len() || lengths.len() != losses.len() {
            return Err(st_err(path, "lengths, samples and loss differ in count"));
        }
        let version = get("version")?;
        let (with_needle, with_needle_e) = match version.as_str() {
            "1" => (false, false),
            "2" => (true, false),
            "3" => (true, true),
            v => {
                return Err(st_err(
                    path,
                    format!("version {v} (this moac reads 1 to 3)"),
                ))
            }
        };
        let (nl, nh) = (shape.num_layers, shape.num_query_heads);
        let mut levels = Vec::new();
        for ((&n, &s), &loss) in lengths.iter().zip(&samples).zip(&losses) {
            let n = n as usize;
            let read = |name: &str, per: usize| -> Result<Vec<f64>> {
                let key = format!("n{n}.{name}");
                let t = st
                    .tensor(&key)
                    .map_err(|e| st_err(path, format!("{key}: {e}")))?;
                let want = if per == 1 {
                    vec![nl, nh]
                } else {
                    vec![nl, nh, per]
                };
                if t.dtype() != StDtype::F64 || t.shape() != want.as_slice() {
                    return Err(st_err(
                        path,
                        format!(
                            "{key}: {:?} {:?}, expected F64 {want:?}",
                            t.dtype(),
                            t.shape()
                        ),
                    ));
                }
                Ok(t.data()
                    .chunks_exact(8)
                    .map(|c| {
                        let mut b = [0u8; 8];
                        b.copy_from_slice(c);
                        f64::from_le_bytes(b)
                    })
                    .collect())
            };
            let nb = n.div_ceil(64);
            let sums = |prefix: &str, with_rows: bool| -> Result<Vec<Vec<HeadSums>>> {
                let name = |x: &str| format!("{prefix}{x}");
                let (total, sinks) = (read(&name("total"), 1)?, read(&name("sink"), 1)?);
                let (token, block) = (read(&name("token"), n)?, read(&name("block"), nb)?);
                let rows = if with_rows {
                    read(&name("rows"), nb + 1)?
                } else {
                    vec![0.0; nl * nh * (nb + 1)]
                };
                Ok((0..nl)
                    .map(|l| {
                        (0..nh)
                            .map(|h| {
                                let i = l * nh + h;
                                HeadSums {
                                    total: total[i],
                                    sink: sinks[i],
                                    token: token[i * n..(i + 1) * n].to_vec(),
                                    block: block[i * nb..(i + 1) * nb].to_vec(),
                                    rows: rows[i * (nb + 1)..(i + 1) * (nb + 1)].to_vec(),
                                }
                            })
                            .collect()
                    })
                    .collect())
            };
            let heads = sums("", with_needle)?;
            let needle = if with_needle {
                Some(sums("needle.", false)?)
            } else {
                None
            };
            let needle_influence = if with_needle_e {
                Some(sums("needle_e.", false)?)
            } else {
                None
            };
            levels.push(Level {
                length: n,
                samples: s as usize,
                loss,
                heads,
                needle,
                needle_influence,
            });
        }
        if levels.is_empty() {
            return Err(st_err(path, "no length levels"));
        }
        Ok(Profile {
            model: get("model")?,
            shape,
            sink,
            levels,
        })
    }

    /// Checks the profile was made for `shape` and covers `lengths`.
    pub fn check(&self, path: &Path, shape: &ModelShape) -> Result<()> {
        if &self.shape != shape {
            return Err(Error::PlanMismatch {
                plan: path.to_path_buf(),
                message: format!(
                    "the profile is of {} ({} layers x {} query heads, {} KV heads); the model has {} layers x {} query heads, {} KV heads",
                    self.model,
                    self.shape.num_layers,
                    self.shape.num_query_heads,
                    self.shape.num_kv_heads,
                    shape.num_layers,
                    shape.num_query_heads,
                    shape.num_kv_heads
                ),
            });
        }
        Ok(())
    }
}

/// Where [`run`] keeps finished samples of `output`.
pub fn parts_dir(output: &Path) -> PathBuf {
    let mut s = output.as_os_str().to_owned();
    s.push(".parts");
    PathBuf::from(s)
}

/// Profiles `set`'s samples at `lengths` (every length in the set when empty), resuming
/// from `<output>.parts/`; `progress(done, total, resumed)` after each sample. Returns
/// the profile (the caller writes it; then the parts may go).
pub fn run(
    llama: &Llama,
    model_name: &str,
    set: &CalibSet,
    lengths: &[usize],
    sink: u64,
    output: &Path,
    progress: &mut dyn FnMut(usize, usize, bool),
) -> Result<Profile> {
    let have = set.lengths();
    let lengths: Vec<usize> = if lengths.is_empty() {
        have.clone()
    } else {
        lengths.to_vec()
    };
    if let Some(l) = lengths.iter().find(|l| !have.contains(l)) {
        return Err(Error::Usage(format!(
            "the calibration set has no samples of length {l} (it has {have:?})"
        )));
    }
    let shape = llama.config.shape();
    let parts = parts_dir(output);
    std::fs::create_dir_all(&parts).map_err(|source| Error::Io {
        path: parts.clone(),
        source,
    })?;
    let todo: Vec<&CalibSample> = set
        .samples
        .iter()
        .filter(|s| lengths.contains(&s.length))
        .collect();
    let mut levels = Vec::new();
    let mut done = 0;
    for &n in &lengths {
        let mut level = Level {
            length: n,
            samples: 0,
            loss: 0.0,
            heads: vec![vec![HeadSums::new(n); shape.num_query_heads]; shape.num_layers],
            needle: Some(vec![
                vec![HeadSums::new(n); shape.num_query_heads];
                shape.num_layers
            ]),
            needle_influence: Some(vec![
                vec![HeadSums::new(n); shape.num_query_heads];
                shape.num_layers
            ]),
        };
        let mine: Vec<&&CalibSample> = todo.iter().filter(|s| s.length == n).collect();
        let w = 1.0 / mine.len() as f64;
        for s in mine {
            // The name carries a hash of the tokens: a part of another calibration
            // set (same ids, other text) is never taken for this one's.
            let hash = s.tokens.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &t| {
                (h ^ t as u64).wrapping_mul(0x100_0000_01b3)
            });
            // Ids are free text (a task may name its source): only file-name-safe
            // characters go into the part's name, the hash keeps it unique.
            let safe: String =
                s.id.chars()
                    .take(64)
                    .map(|c| {
                        if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                            c
                        } else {
                            '_'
                        }
                    })
                    .collect();
            let part = parts.join(format!("{safe}-{hash:016x}.safetensors"));
            let cached = std::fs::read(&part)
                .ok()
                .and_then(|b| Profile::from_bytes(&part, &b).ok())
                .filter(|p| {
                    p.model == model_name
                        && p.shape == shape
                        && p.sink == sink
                        && p.levels.len() == 1
                        && p.levels[0].length == n
                        && p.levels[0].needle.is_some()
                        && p.levels[0].needle_influence.is_some()
                });
            let (one, resumed) = match cached {
                Some(p) => (p, true),
                None => {
                    let inf = llama.influence(&s.tokens, s.prompt_len, n, sink as usize, None)?;
                    let p = Profile {
                        model: model_name.to_string(),
                        shape,
                        sink,
                        levels: vec![Level {
                            length: n,
                            samples: 1,
                            loss: inf.loss,
                            heads: inf.heads,
                            needle: Some(inf.needle),
                            needle_influence: Some(inf.needle_influence),
                        }],
                    };
                    p.write(&part)?;
                    (p, false)
                }
            };
            let lv = &one.levels[0];
            level.loss += w * lv.loss;
            for (a, b) in level
                .heads
                .iter_mut()
                .flatten()
                .zip(lv.heads.iter().flatten())
            {
                a.add(b, w);
            }
            for (mine, theirs) in [
                (level.needle.as_mut(), lv.needle.as_ref()),
                (
                    level.needle_influence.as_mut(),
                    lv.needle_influence.as_ref(),
                ),
            ] {
                if let (Some(mine), Some(theirs)) = (mine, theirs) {
                    for (a, b) in mine.iter_mut().flatten().zip(theirs.iter().flatten()) {
                        a.add(b, w);
                    }
                }
            }
            level.samples += 1;
            done += 1;
            progress(done, todo.len(), resumed);
        }
        levels.push(level);
    }
    // The backward pass's [T, T] buffers stay pooled between samples; not after.
    super::causal::release_scratch();
    Ok(Profile {
        model: model_name.to_string(),
        shape,
        sink,
        levels,
    })
}
