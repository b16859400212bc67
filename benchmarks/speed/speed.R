# Times lme4's lmer and lmerTest (fit + Satterthwaite df) on the battery's models, on the same CSVs that
# lmm_symbolic reads (benchmarks/lme4_battery/data, factors in R's level order from the JSON sidecars).
#
# Usage: Rscript benchmarks/speed/speed.R OUT.json FILTER MIN_SECONDS
# Each model: one warm-up, then blocks of k fits (k chosen so a block takes >= MIN_SECONDS / 3), three
# blocks; the median block time / k is the time per fit.
suppressPackageStartupMessages({ library(lme4); library(jsonlite) })
suppressPackageStartupMessages(requireNamespace("lmerTest"))
args <- commandArgs(TRUE)
out_path <- args[1]; FILTER <- if (length(args) >= 2) args[2] else "."
MIN_SECONDS <- if (length(args) >= 3) as.numeric(args[3]) else 0.6
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
  blocks <- vapply(1:3, function(i) system.time(for (j in seq_len(k)) f())[["elapsed"]] / k, 0)
  median(blocks)
}
out <- list()
for (case in cases) {
  if (!grepl(FILTER, case$id, perl = TRUE) || !is.null(case$error)) next
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
  t_lmer <- per_fit(lmer_fit)
  t_test <- tryCatch(per_fit(lmertest_fit), error = function(e) NA_real_)
  ll <- as.numeric(logLik(lmer_fit()))
  cat(sprintf("%-28s lmer %.4f s  lmerTest %.4f s\n", case$id, t_lmer, t_test))
  out[[case$id]] <- list(lmer = t_lmer, lmerTest = t_test, loglik = ll)
}
writeLines(toJSON(out, auto_unbox = TRUE, digits = NA, pretty = TRUE, na = "null"), out_path)
