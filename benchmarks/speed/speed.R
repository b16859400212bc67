# Times lme4's lmer and lmerTest (fit + Satterthwaite df) on the battery's models, on the same CSVs that
# lmm_symbolic reads (benchmarks/lme4_battery/data, factors in R's level order from the JSON sidecars).
#
# Usage: Rscript benchmarks/speed/speed.R MIN_SECONDS   (driven by run.py through stdin/stdout)
# Reads one model id per line on stdin and answers one JSON line on stdout, so that run.py can time lme4
# and lmm_symbolic on each model back to back (a busy machine slows both alike). Each model: one warm-up,
# then three blocks of k fits (k chosen so a block takes >= MIN_SECONDS / 3); the median block / k is the
# time per fit, wall clock ("elapsed") and CPU ("user" + "system").
suppressPackageStartupMessages({ library(lme4); library(jsonlite) })
suppressPackageStartupMessages(requireNamespace("lmerTest"))
args <- commandArgs(TRUE)
MIN_SECONDS <- if (length(args) >= 1) as.numeric(args[1]) else 0.6
here <- local({
  a <- grep("^--file=", commandArgs(FALSE), value = TRUE)
  dirname(normalizePath(sub("^--file=", "", a[1])))
})
battery <- file.path(here, "..", "lme4_battery")
cases <- fromJSON(file.path(battery, "lme4_battery.json"), simplifyVector = FALSE)$fits
load_data <- function(name) {
  meta <- fromJSON(file.path(battery, "data", paste0(name, ".json")), simplifyVector = FALSE)
  d <- read.csv(file.path(battery, "data", paste0(name, ".csv")), na.strings = "", stringsAsFactors = FALSE,
                check.names = FALSE)
  for (col in meta$columns) {
    if (col$class %in% c("factor", "ordered"))
      d[[col$name]] <- factor(d[[col$name]], levels = unlist(col$levels), ordered = col$class == "ordered")
  }
  d
}
per_fit <- function(f) {
  f()
  t1 <- system.time(f())[["elapsed"]]
  k <- max(1L, as.integer(ceiling(MIN_SECONDS / 3 / max(t1, 1e-3))))
  blocks <- lapply(1:3, function(i) system.time(for (j in seq_len(k)) f()))
  wall <- vapply(blocks, function(b) b[["elapsed"]], 0) / k
  cpu <- vapply(blocks, function(b) b[["user.self"]] + b[["sys.self"]], 0) / k
  list(wall = median(wall), cpu = median(cpu))
}
input <- file("stdin", "r")
repeat {
  id <- readLines(input, n = 1)
  if (!length(id) || id == "") break
  case <- cases[[id]]
  d <- load_data(case$dataset)
  form <- as.formula(case$formula)
  reml <- case$method == "REML"
  w <- if (!is.null(case$weights)) d[[case$weights]] else NULL
  lmer_fit <- function() suppressWarnings(suppressMessages(
    if (is.null(w)) lmer(form, data = d, REML = reml) else lmer(form, data = d, REML = reml, weights = w)))
  lmertest_fit <- function() suppressWarnings(suppressMessages({
    m <- if (is.null(w)) lmerTest::lmer(form, data = d, REML = reml)
         else lmerTest::lmer(form, data = d, REML = reml, weights = w)
    summary(m)$coefficients }))
  a <- per_fit(lmer_fit)
  b <- tryCatch(per_fit(lmertest_fit), error = function(e) list(wall = NA_real_, cpu = NA_real_))
  ll <- as.numeric(logLik(lmer_fit()))
  cat(toJSON(list(id = id, lmer = a$wall, lmer_cpu = a$cpu, lmerTest = b$wall, lmerTest_cpu = b$cpu,
                  loglik = ll), auto_unbox = TRUE, digits = NA, na = "null"), "\n", sep = "")
  flush(stdout())
}
