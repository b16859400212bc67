# Fit a batch of generated designs with lme4 in one call: Rscript fit_lme4.R DIR OUT.json
# DIR holds manifest.csv (seed, family, formula, weights) and seed<N>.csv; columns named g, h, f are factors.
suppressPackageStartupMessages({ library(lme4); library(jsonlite) })
a <- commandArgs(TRUE); dir <- a[1]; out <- a[2]
man <- read.csv(file.path(dir, "manifest.csv"), stringsAsFactors = FALSE, na.strings = "")
res <- list()
for (i in seq_len(nrow(man))) {
  m <- man[i, ]
  d <- read.csv(file.path(dir, paste0("seed", m$seed, ".csv")), na.strings = "")
  for (c in intersect(c("g", "h", "f"), names(d))) d[[c]] <- factor(d[[c]])
  for (reml in c(FALSE, TRUE)) {
    msgs <- character(0)
    fit <- tryCatch(withCallingHandlers(
      if (!is.na(m$weights) && nzchar(m$weights)) lmer(as.formula(m$formula), d, REML = reml, weights = d[[m$weights]])
      else lmer(as.formula(m$formula), d, REML = reml),
      warning = function(w) { msgs <<- c(msgs, conditionMessage(w)); invokeRestart("muffleWarning") },
      message = function(e) { msgs <<- c(msgs, conditionMessage(e)); invokeRestart("muffleMessage") }),
      error = function(e) e)
    key <- paste0(m$seed, if (reml) "_reml" else "_ml")
    r <- list(seed = m$seed, family = m$family, formula = m$formula, method = if (reml) "REML" else "ML",
              messages = unique(msgs))
    if (inherits(fit, "error")) r$error <- conditionMessage(fit)
    else { r$loglik <- as.numeric(logLik(fit)); r$n_obs <- nobs(fit); r$fixed <- as.list(fixef(fit))
           r$theta <- as.list(getME(fit, "theta")) }
    res[[key]] <- r
  }
}
writeLines(toJSON(res, auto_unbox = TRUE, digits = NA, pretty = TRUE), out)
