# Export the data sets shipped with lmm_symbolic as CSV files.
#
# Usage (from anywhere):  Rscript tests/reference/export_datasets.R
#
# Writes into lmm_symbolic/datasets/data/ (found relative to this script):
#   toy.csv, sleepstudy.csv, Dyestuff.csv, Dyestuff2.csv, Pastes.csv, Penicillin.csv, SOURCES.md
# Numbers are written with 15 significant digits (write.csv's default), which
# reproduces every value of these data sets exactly; the check at the end
# re-reads each file and compares it with the R object.

suppressPackageStartupMessages(library(lme4))

script_dir <- function() {
  args <- commandArgs(trailingOnly = FALSE)
  file_arg <- grep("^--file=", args, value = TRUE)
  if (length(file_arg) == 0) return(normalizePath(getwd()))
  dirname(normalizePath(sub("^--file=", "", file_arg[1])))
}

here <- script_dir()
out_dir <- normalizePath(file.path(here, "..", "..", "lmm_symbolic", "datasets", "data"),
                         mustWork = FALSE)
dir.create(out_dir, recursive = TRUE, showWarnings = FALSE)

# The toy data of the tutorial "Linear Mixed Model from scratch":
# two individuals, each measured without (Treat = 0) and with (Treat = 1) treatment.
toy <- data.frame(
  Treat = c(0, 1, 0, 1),
  Resp = c(10, 25, 3, 6),
  Ind = factor(c(1, 1, 2, 2))
)

datasets <- list(
  toy = toy,
  sleepstudy = lme4::sleepstudy[, c("Reaction", "Days", "Subject")],
  Dyestuff = lme4::Dyestuff[, c("Batch", "Yield")],
  Dyestuff2 = lme4::Dyestuff2[, c("Batch", "Yield")],
  Pastes = lme4::Pastes[, c("strength", "batch", "cask", "sample")],
  Penicillin = lme4::Penicillin[, c("diameter", "plate", "sample")]
)

for (name in names(datasets)) {
  d <- datasets[[name]]
  file <- file.path(out_dir, paste0(name, ".csv"))
  write.csv(d, file, row.names = FALSE)
  # Round trip: the file must reproduce the data exactly.
  back <- read.csv(file, stringsAsFactors = FALSE)
  for (col in names(d)) {
    if (is.factor(d[[col]])) {
      ok <- identical(as.character(back[[col]]), as.character(d[[col]]))
    } else {
      ok <- identical(as.numeric(back[[col]]), as.numeric(d[[col]]))
    }
    if (!ok) stop(sprintf("%s.csv: column %s does not round-trip exactly", name, col))
  }
  cat(sprintf("wrote %s (%d rows)\n", file, nrow(d)))
}

lme4_version <- as.character(packageVersion("lme4"))
dg <- "O.L. Davies and P.L. Goldsmith (eds), Statistical Methods in Research and Production, 4th ed., Oliver and Boyd (1972)"
bt <- "G.E.P. Box and G.C. Tiao, Bayesian Inference in Statistical Analysis, Addison-Wesley (1973)"
sources <- c(
  "# Sources of the shipped data sets",
  "",
  sprintf("Written by `tests/reference/export_datasets.R` (%s, R package lme4 %s).",
          R.version.string, lme4_version),
  "References are those given on lme4's help pages. Grouping columns are R factors; the CSV files hold their labels.",
  "",
  "- `toy.csv` -- columns `Treat`, `Resp`, `Ind`: the toy data of the tutorial \"Linear Mixed Model from scratch\" (two individuals `Ind`, each observed untreated and treated, `Treat` = 0/1), constructed in R.",
  sprintf("- `sleepstudy.csv` -- columns `Reaction`, `Days`, `Subject`: `lme4::sleepstudy` (R package lme4 %s); Belenky, Wesensten, Thorne, Thomas, Sing, Redmond, Russo and Balkin (2003), Patterns of performance degradation and restoration during sleep restriction and subsequent recovery: a sleep dose-response study, Journal of Sleep Research 12, 1-12.", lme4_version),
  sprintf("- `Dyestuff.csv` -- columns `Batch`, `Yield`: `lme4::Dyestuff` (R package lme4 %s); %s, section 6.4; %s, section 5.1.2.", lme4_version, dg, bt),
  sprintf("- `Dyestuff2.csv` -- columns `Batch`, `Yield`: `lme4::Dyestuff2` (R package lme4 %s), constructed data with the structure of Dyestuff; %s, section 5.1.2 (Dyestuff itself: %s, section 6.4).", lme4_version, bt, dg),
  sprintf("- `Pastes.csv` -- columns `strength`, `batch`, `cask`, `sample`: `lme4::Pastes` (R package lme4 %s); %s, section 6.5.", lme4_version, dg),
  sprintf("- `Penicillin.csv` -- columns `diameter`, `plate`, `sample`: `lme4::Penicillin` (R package lme4 %s); %s, section 6.6.", lme4_version, dg)
)
writeLines(sources, file.path(out_dir, "SOURCES.md"))
cat(sprintf("wrote %s\n", file.path(out_dir, "SOURCES.md")))
