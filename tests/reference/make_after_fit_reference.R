# Reference values from lme4 for what comes after the fit (tests/test_inference.py):
# predict (with and without the random effects, new levels of a grouping factor, scale() and poly()
# applied to new rows with the fit's parameters), profile confidence intervals (confint's default),
# anova tables, bootMer percentile intervals, and the moments of simulate().
#
# Usage:  Rscript tests/reference/make_after_fit_reference.R [OUT.json]
#         (default OUT: after_fit_reference.json next to this script)
#         LMM_PROFILE_CASES=toy_ML,dyestuff_REML Rscript ...   profiles only these cases (the test's fresh
#         run: the fine-grid profiles of every case take many minutes, the three-effect term most of them)
#
# The data are the CSV files the package ships (lmm_symbolic/datasets/data/), read as
# make_reference.R reads them: grouping columns as factors, everything else numeric.

suppressPackageStartupMessages({
  library(lme4)
  library(jsonlite)
})

script_dir <- function() {
  args <- commandArgs(trailingOnly = FALSE)
  file_arg <- grep("^--file=", args, value = TRUE)
  if (length(file_arg) == 0) return(normalizePath(getwd()))
  dirname(normalizePath(sub("^--file=", "", file_arg[1])))
}
here <- script_dir()
args <- commandArgs(trailingOnly = TRUE)
out_file <- if (length(args) >= 1) args[1] else file.path(here, "after_fit_reference.json")
data_dir <- normalizePath(file.path(here, "..", "..", "lmm_symbolic", "datasets", "data"))

read_dataset <- function(name, groups) {
  d <- read.csv(file.path(data_dir, paste0(name, ".csv")), stringsAsFactors = FALSE)
  for (col in names(d)) d[[col]] <- if (col %in% groups) factor(d[[col]]) else as.numeric(d[[col]])
  d
}
sleep <- read_dataset("sleepstudy", "Subject")
toy <- read_dataset("toy", "Ind")
dyestuff <- read_dataset("Dyestuff", "Batch")
penicillin <- read_dataset("Penicillin", c("plate", "sample"))
pastes <- read_dataset("Pastes", c("batch", "cask", "sample"))

NSIM_BOOT <- 500L
NSIM_SIM <- 4000L

# new rows: known levels, a level the fit never saw, Days between and beyond the observed ones
new_sleep <- data.frame(Days = c(0, 2.5, 9, 4, 12, 1),
                        Subject = factor(c("308", "372", "999", "new", "308", "335")))
new_toy <- data.frame(Treat = c(0, 1, 0, 1), Ind = factor(c("1", "2", "99", "99")))

mat <- function(m) list(rows = rownames(m), cols = colnames(m), values = unname(lapply(seq_len(nrow(m)), function(i) unname(m[i, ]))))

anova_table <- function(a) {
  a <- as.data.frame(a)
  dev_col <- intersect(c("deviance", "-2*log(L)"), names(a))[1]
  list(rows = rownames(a), npar = a$npar, AIC = a$AIC, BIC = a$BIC, logLik = a$logLik,
       deviance = a[[dev_col]], Chisq = a$Chisq, Df = a$Df, p = a[["Pr(>Chisq)"]])
}

case <- function(formula, data, newdata, boot = TRUE) {
  m <- lmer(formula, data = data, REML = TRUE)
  out <- list(formula = deparse1(formula), method = "REML",
              newdata = newdata,
              predict_conditional = unname(predict(m, newdata = newdata, allow.new.levels = TRUE)),
              predict_population = unname(predict(m, newdata = newdata, re.form = NA)),
              fitted_conditional = unname(fitted(m)),
              fitted_population = unname(predict(m, re.form = NA)),
              residuals_conditional = unname(residuals(m)),
              theta = unname(getME(m, "theta")), sigma = sigma(m))
  ci <- suppressMessages(confint(m, method = "profile"))
  out$confint_profile <- mat(ci)
  # the moments simulate()'s draws follow: E y = X beta, var y_i = sigma^2 (||Lambda^T z_i||^2 + 1)
  Z <- getME(m, "Z"); L <- getME(m, "Lambda")
  out$marginal_variance <- unname(sigma(m)^2 * (rowSums(as.matrix(Z %*% L)^2) + 1))
  sims <- as.matrix(simulate(m, nsim = NSIM_SIM, seed = 1))
  out$simulate <- list(nsim = NSIM_SIM, mean = unname(rowMeans(sims)), var = unname(apply(sims, 1, var)))
  if (boot) {
    set.seed(2)
    t0 <- Sys.time()
    cb <- suppressMessages(suppressWarnings(confint(m, method = "boot", nsim = NSIM_BOOT, boot.type = "perc")))
    out$confint_boot <- c(mat(cb), list(nsim = NSIM_BOOT, seconds = as.numeric(Sys.time() - t0, units = "secs")))
  }
  out
}

# bootMer refits each simulated response with refit(), which starts the optimiser at the original fit's
# theta; on the 4-row toy data that lands elsewhere than a fresh lmer fit of the same response in most
# draws. The same parametric bootstrap with a fresh lmer fit per draw, for comparison:
fresh_bootstrap <- function(formula, data, response, nsim) {
  m <- lmer(formula, data = data, REML = TRUE)
  sims <- simulate(m, nsim = nsim, seed = 3)
  pars <- t(sapply(sims, function(y) {
    data[[response]] <- y
    x <- suppressMessages(suppressWarnings(lmer(formula, data = data, REML = TRUE)))
    c(getME(x, "theta") * sigma(x), sigma(x), fixef(x))
  }))
  q <- t(apply(pars, 2, quantile, probs = c(0.025, 0.975), type = 7))
  rownames(q) <- c(".sig01", ".sigma", names(fixef(m)))
  c(mat(q), list(nsim = nsim, boundary_share = mean(pars[, 1] < 1e-4)))
}

res <- list(
  generated_by = "tests/reference/make_after_fit_reference.R",
  R = R.version.string, lme4 = as.character(packageVersion("lme4")),
  cases = list(
    sleepstudy_intercept = case(Reaction ~ Days + (1 | Subject), sleep, new_sleep),
    sleepstudy_slope = case(Reaction ~ Days + (Days | Subject), sleep, new_sleep),
    sleepstudy_poly = case(Reaction ~ poly(Days, 2) + (1 | Subject), sleep, new_sleep, boot = FALSE),
    sleepstudy_scale = case(Reaction ~ scale(Days) + (1 | Subject), sleep, new_sleep, boot = FALSE),
    toy = case(Resp ~ Treat + (1 | Ind), toy, new_toy)
  )
)

s0 <- lmer(Reaction ~ 1 + (1 | Subject), sleep)
s1 <- lmer(Reaction ~ Days + (1 | Subject), sleep)
s2 <- lmer(Reaction ~ Days + (Days | Subject), sleep)
t0 <- lmer(Resp ~ 1 + (1 | Ind), toy)
t1 <- lmer(Resp ~ Treat + (1 | Ind), toy)
res$cases$toy$bootstrap_fresh_lmer <- fresh_bootstrap(Resp ~ Treat + (1 | Ind), toy, "Resp", NSIM_BOOT)

res$anova <- list(
  sleepstudy_refit = c(list(formulas = c("Reaction ~ 1 + (1|Subject)", "Reaction ~ Days + (1|Subject)",
                                         "Reaction ~ Days + (Days|Subject)")),
                       anova_table(suppressMessages(anova(s0, s1, s2)))),
  sleepstudy_random_reml = c(list(formulas = c("Reaction ~ Days + (1|Subject)", "Reaction ~ Days + (Days|Subject)")),
                             anova_table(anova(s1, s2, refit = FALSE))),
  toy_refit = c(list(formulas = c("Resp ~ 1 + (1|Ind)", "Resp ~ Treat + (1|Ind)")),
                anova_table(suppressMessages(anova(t0, t1))))
)

# Profile intervals. confint(fit) interpolates a spline through profile()'s points, taken every
# delta.cutoff (1/8 by default) in zeta: a few points per parameter, so its limits can sit some 1e-2 away
# from the roots of zeta = +-qnorm(0.975) on small data. The same profile on a fine grid (delta.cutoff =
# PROFILE_FINE, up to maxpts points each way) converges to the roots: lmm_symbolic is tested against those
# and its differences to both reported. A REML fit is profiled as lme4 does it: its ML refit (devfun2).
PROFILE_FINE <- 1 / 128
sleep_w <- transform(sleep, w = 1 + (as.integer(Subject) %% 3))
profile_case <- function(formula, data, reml, weights = NULL) {
  m <- if (is.null(weights)) lmer(formula, data = data, REML = reml)
       else do.call(lmer, list(formula = formula, data = data, REML = reml, weights = data[[weights]]))
  t0 <- Sys.time()
  ci <- suppressWarnings(suppressMessages(confint(m)))
  seconds <- as.numeric(Sys.time() - t0, units = "secs")
  t0 <- Sys.time()
  pr <- suppressWarnings(suppressMessages(profile(m, delta.cutoff = PROFILE_FINE, maxpts = 2000)))
  fine <- suppressWarnings(suppressMessages(confint(pr)))
  list(formula = deparse1(formula), method = if (reml) "REML" else "ML", weights = weights,
       theta_names = names(getME(m, "theta")),
       confint_default = mat(ci), seconds = seconds,
       confint_fine = c(mat(fine), list(delta_cutoff = PROFILE_FINE, points = nrow(pr),
                                        seconds_fine = as.numeric(Sys.time() - t0, units = "secs"))))
}
profile_calls <- alist(
  toy_ML = profile_case(Resp ~ Treat + (1 | Ind), toy, FALSE),
  toy_REML = profile_case(Resp ~ Treat + (1 | Ind), toy, TRUE),
  sleepstudy_intercept_ML = profile_case(Reaction ~ Days + (1 | Subject), sleep, FALSE),
  sleepstudy_slope_ML = profile_case(Reaction ~ Days + (Days | Subject), sleep, FALSE),
  sleepstudy_slope_REML = profile_case(Reaction ~ Days + (Days | Subject), sleep, TRUE),
  dyestuff_REML = profile_case(Yield ~ 1 + (1 | Batch), dyestuff, TRUE),
  penicillin_REML = profile_case(diameter ~ 1 + (1 | plate) + (1 | sample), penicillin, TRUE),
  penicillin_reversed_REML = profile_case(diameter ~ 1 + (1 | sample) + (1 | plate), penicillin, TRUE),
  pastes_REML = profile_case(strength ~ 1 + (1 | batch / cask), pastes, TRUE),
  # two terms on one factor; a term of three (its correlations near -1: the profile must stay among the
  # positive semi-definite correlation matrices); prior weights w = 1 + (subject's index mod 3)
  sleepstudy_doublebar_ML = profile_case(Reaction ~ Days + (1 | Subject) + (0 + Days | Subject), sleep, FALSE),
  sleepstudy_q3_ML = profile_case(Reaction ~ Days + (Days + I(Days^2) | Subject), sleep, FALSE),
  sleepstudy_weighted_ML = profile_case(Reaction ~ Days + (Days | Subject), sleep_w, FALSE, weights = "w")
)
selected <- Sys.getenv("LMM_PROFILE_CASES", "")
selected <- if (nzchar(selected)) strsplit(selected, ",")[[1]] else names(profile_calls)
res$profiles <- lapply(profile_calls[selected], eval, envir = globalenv())

writeLines(toJSON(res, digits = NA, auto_unbox = TRUE, pretty = TRUE, na = "null"), out_file)
cat("wrote", out_file, "\n")
