# Reference values from R (lme4, lmerTest, nlme) for the Python tests of lmm_symbolic.
#
# Usage:  Rscript tests/reference/make_reference.R [OUT.json]
#         (default OUT: lme4_reference.json next to this script)
#
# The data are read from the CSV files the package ships
# (lmm_symbolic/datasets/data/, located relative to this script), so the fits
# use exactly the data the Python side loads.  Grouping columns are read as
# factors, every other column stays numeric.
#
# Every case is fitted with lme4::lmer (ML and REML), lmerTest (Satterthwaite
# df and p values) and, where it can express the model, nlme::lme.  A failing
# fit is recorded under "error"; warnings and messages (e.g. singular fits) are
# recorded under "warnings" and never abort the run.

suppressPackageStartupMessages({
  library(lme4)
  library(nlme)
  library(jsonlite)
})
# lmerTest is used through lmerTest::lmer only, so lme4::lmer stays unmasked.
suppressPackageStartupMessages(requireNamespace("lmerTest"))

N_TIMING <- 20L

script_dir <- function() {
  args <- commandArgs(trailingOnly = FALSE)
  file_arg <- grep("^--file=", args, value = TRUE)
  if (length(file_arg) == 0) return(normalizePath(getwd()))
  dirname(normalizePath(sub("^--file=", "", file_arg[1])))
}

here <- script_dir()
args <- commandArgs(trailingOnly = TRUE)
out_file <- if (length(args) >= 1) args[1] else file.path(here, "lme4_reference.json")
data_dir <- normalizePath(file.path(here, "..", "..", "lmm_symbolic", "datasets", "data"))

# ---------------------------------------------------------------- data ----
grouping <- list(
  toy = "Ind",
  sleepstudy = "Subject",
  Dyestuff = "Batch",
  Dyestuff2 = "Batch",
  Pastes = c("batch", "cask", "sample"),
  Penicillin = c("plate", "sample"),
  crossed_slopes = c("a", "b")
)
# the simulated crossed design lives beside this script (tests/reference/crossed_slopes.csv)
data_path <- function(name) {
  if (name == "crossed_slopes") file.path(here, "crossed_slopes.csv") else file.path(data_dir, paste0(name, ".csv"))
}

read_dataset <- function(name) {
  d <- read.csv(data_path(name), stringsAsFactors = FALSE)
  for (col in names(d)) {
    if (col %in% grouping[[name]]) {
      d[[col]] <- factor(d[[col]])          # levels sorted, as in lme4's own data
    } else {
      d[[col]] <- as.numeric(d[[col]])
    }
  }
  d
}
data_sets <- lapply(setNames(names(grouping), names(grouping)), read_dataset)

# --------------------------------------------------------------- cases ----
# id -> data set, lme4 formula, nlme (fixed, random) or NULL
cases <- list(
  toy = list(dataset = "toy", formula = "Resp ~ Treat + (1|Ind)",
             nlme = list(fixed = "Resp ~ Treat", random = "~1|Ind")),
  toy_cellmeans = list(dataset = "toy", formula = "Resp ~ 0 + factor(Treat) + (1|Ind)",
                       nlme = list(fixed = "Resp ~ 0 + factor(Treat)", random = "~1|Ind")),
  sleepstudy_intercept = list(dataset = "sleepstudy", formula = "Reaction ~ Days + (1|Subject)",
                              nlme = list(fixed = "Reaction ~ Days", random = "~1|Subject")),
  dyestuff = list(dataset = "Dyestuff", formula = "Yield ~ 1 + (1|Batch)",
                  nlme = list(fixed = "Yield ~ 1", random = "~1|Batch")),
  dyestuff2 = list(dataset = "Dyestuff2", formula = "Yield ~ 1 + (1|Batch)",
                   nlme = list(fixed = "Yield ~ 1", random = "~1|Batch")),
  sleepstudy_slope = list(dataset = "sleepstudy", formula = "Reaction ~ Days + (Days|Subject)",
                          nlme = list(fixed = "Reaction ~ Days", random = "~Days|Subject")),
  sleepstudy_slope_uncorrelated = list(
    dataset = "sleepstudy", formula = "Reaction ~ Days + (1|Subject) + (0 + Days|Subject)",
    nlme = list(fixed = "Reaction ~ Days", random = "list(Subject = pdDiag(~Days))")),
  pastes = list(dataset = "Pastes", formula = "strength ~ 1 + (1|batch/cask)",
                nlme = list(fixed = "strength ~ 1", random = "~1|batch/cask")),
  penicillin = list(dataset = "Penicillin", formula = "diameter ~ 1 + (1|plate) + (1|sample)",
                    nlme = NULL),  # crossed random effects: not expressed with nlme here
  crossed_slopes = list(dataset = "crossed_slopes", formula = "y ~ x + (x|a) + (1|b)", nlme = NULL)
)

# ------------------------------------------------------------- helpers ----
# Run expr, collecting warnings and messages instead of printing/aborting.
capture <- function(expr) {
  notes <- character(0)
  value <- withCallingHandlers(
    expr,
    warning = function(w) {
      notes <<- c(notes, paste0("warning: ", conditionMessage(w)))
      invokeRestart("muffleWarning")
    },
    message = function(m) {
      notes <<- c(notes, paste0("message: ", trimws(conditionMessage(m))))
      invokeRestart("muffleMessage")
    }
  )
  list(value = value, notes = unique(notes))
}

# Run a section; on error return list(error = message).
section <- function(fun) {
  out <- tryCatch({
    res <- capture(fun())
    c(res$value, list(warnings = I(res$notes)))
  }, error = function(e) list(error = conditionMessage(e)))
  out
}

# Median elapsed time of N_TIMING refits.  One gc() up front instead of
# system.time's gcFirst, which would dominate the run time (~0.2 s a call).
median_time <- function(fit_fun) {
  invisible(gc())
  times <- vapply(seq_len(N_TIMING), function(i) {
    suppressWarnings(suppressMessages(
      system.time(fit_fun(), gcFirst = FALSE)[["elapsed"]]
    ))
  }, numeric(1))
  median(times)
}

vec <- function(x) I(unname(as.numeric(x)))   # always a JSON array, never unboxed
mat <- function(x) unname(as.matrix(x))        # matrices are written row by row

# --------------------------------------------------------------- lme4 ----
lme4_section <- function(form, d, reml) {
  fit_fun <- function() lme4::lmer(form, data = d, REML = reml)
  fit <- fit_fun()
  co <- summary(fit)$coefficients
  fixed <- lapply(seq_len(nrow(co)), function(i) list(
    name = rownames(co)[i],
    estimate = co[i, "Estimate"],
    std_error = co[i, "Std. Error"],
    t_value = co[i, "t value"]
  ))
  vc <- as.data.frame(VarCorr(fit))
  random <- list()
  correlations <- list()
  for (i in seq_len(nrow(vc))) {
    if (is.na(vc$var2[i])) {
      random[[length(random) + 1]] <- list(
        group = vc$grp[i],
        term = if (is.na(vc$var1[i])) NULL else vc$var1[i],
        variance = vc$vcov[i],
        sd = vc$sdcor[i]
      )
    } else {
      correlations[[length(correlations) + 1]] <- list(
        group = vc$grp[i], term1 = vc$var1[i], term2 = vc$var2[i],
        corr = vc$sdcor[i], covariance = vc$vcov[i]
      )
    }
  }
  re <- ranef(fit, condVar = TRUE)
  cond <- as.data.frame(re)   # grpvar, term, grp, condval, condsd
  ranef_out <- lapply(names(re), function(g) {
    df <- re[[g]]
    condsd <- lapply(colnames(df), function(term) {
      rows <- cond[cond$grpvar == g & cond$term == term, ]
      vec(rows$condsd[match(rownames(df), as.character(rows$grp))])
    })
    c(list(levels = I(rownames(df))),
      setNames(lapply(colnames(df), function(term) vec(df[[term]])), colnames(df)),
      list(condsd = setNames(condsd, colnames(df))))
  })
  names(ranef_out) <- names(re)
  ll <- logLik(fit)
  beta_names <- names(fixef(fit))
  ci <- confint(fit, parm = "beta_", method = "Wald")
  ci <- ci[beta_names, , drop = FALSE]
  theta <- getME(fit, "theta")
  list(
    fixed_effects = fixed,
    random_effects = random,
    correlations = correlations,
    theta = vec(theta),
    theta_names = I(names(theta)),
    sigma = sigma(fit),
    loglik = as.numeric(ll),
    aic = AIC(fit),
    bic = BIC(fit),
    deviance = if (reml) REMLcrit(fit) else deviance(fit),
    reml_criterion = if (reml) REMLcrit(fit) else NULL,
    df_model = attr(ll, "df"),
    singular = isSingular(fit),
    ranef = ranef_out,
    fitted = vec(fitted(fit)),
    vcov = mat(vcov(fit)),
    confint_wald = mat(ci),
    time_seconds = median_time(fit_fun)
  )
}

# ------------------------------------------------------------ lmerTest ----
lmertest_section <- function(form, d, reml) {
  fit <- lmerTest::lmer(form, data = d, REML = reml)
  co <- summary(fit, ddf = "Satterthwaite")$coefficients
  list(fixed_effects = lapply(seq_len(nrow(co)), function(i) list(
    name = rownames(co)[i],
    estimate = co[i, "Estimate"],
    std_error = co[i, "Std. Error"],
    df = co[i, "df"],
    t_value = co[i, "t value"],
    p_value = co[i, "Pr(>|t|)"]
  )))
}

# ---------------------------------------------------------------- nlme ----
# Standard deviations (and correlations) of the random effects, per grouping
# level of the lme fit: {"<group>": {"<term>": sd, ...}}.  For nested models
# the groups are nlme's levels (outermost first), e.g. "batch" and "cask".
nlme_random <- function(fit) {
  sig <- fit$sigma
  re <- fit$modelStruct$reStruct
  sds <- list()
  corrs <- list()
  for (g in rev(names(re))) {           # reStruct stores the innermost level first
    cov <- as.matrix(re[[g]]) * sig^2
    sd <- sqrt(diag(cov))
    sds[[g]] <- as.list(setNames(unname(sd), rownames(cov)))
    if (nrow(cov) > 1) {
      cr <- cov2cor(cov)
      for (i in 1:(nrow(cr) - 1)) for (j in (i + 1):nrow(cr)) {
        corrs[[length(corrs) + 1]] <- list(group = g, term1 = rownames(cr)[i],
                                           term2 = rownames(cr)[j], corr = cr[i, j])
      }
    }
  }
  list(sd = sds, corr = corrs)
}

nlme_section <- function(spec, d, reml) {
  fixed <- as.formula(spec$fixed)
  random <- eval(parse(text = spec$random))
  method <- if (reml) "REML" else "ML"
  fit_fun <- function() nlme::lme(fixed = fixed, random = random, data = d, method = method)
  fit <- fit_fun()
  tt <- summary(fit)$tTable
  rnd <- nlme_random(fit)
  ll <- logLik(fit)
  list(
    fixed = spec$fixed,
    random = spec$random,
    fixed_effects = lapply(seq_len(nrow(tt)), function(i) list(
      name = rownames(tt)[i],
      estimate = tt[i, "Value"],
      std_error = tt[i, "Std.Error"],
      df = tt[i, "DF"],
      t_value = tt[i, "t-value"],
      p_value = tt[i, "p-value"]
    )),
    sigma = fit$sigma,
    random_sd = rnd$sd,
    random_corr = rnd$corr,
    loglik = as.numeric(ll),
    aic = AIC(fit),
    bic = BIC(fit),
    df_model = attr(ll, "df"),
    time_seconds = median_time(fit_fun)
  )
}

# ------------------------------------------------------------ the fits ----
out_cases <- list()
for (id in names(cases)) {
  spec <- cases[[id]]
  d <- data_sets[[spec$dataset]]
  form <- as.formula(spec$formula)
  for (reml in c(FALSE, TRUE)) {
    key <- paste0(id, if (reml) "_reml" else "_ml")
    cat(sprintf("%-40s", key))
    t0 <- proc.time()[["elapsed"]]
    entry <- tryCatch(list(
      dataset = spec$dataset,
      formula = spec$formula,
      method = if (reml) "REML" else "ML",
      n_obs = nrow(d),
      lme4 = section(function() lme4_section(form, d, reml)),
      lmerTest = section(function() lmertest_section(form, d, reml)),
      nlme = if (is.null(spec$nlme)) NULL else section(function() nlme_section(spec$nlme, d, reml))
    ), error = function(e) list(dataset = spec$dataset, formula = spec$formula,
                                method = if (reml) "REML" else "ML",
                                error = conditionMessage(e)))
    out_cases[key] <- list(entry)
    cat(sprintf("%6.1f s\n", proc.time()[["elapsed"]] - t0))
  }
}

# ------------------------------------------------------ paired t test ----
toy <- data_sets$toy
toy <- toy[order(toy$Ind), ]
treated <- toy$Resp[toy$Treat == 1]
untreated <- toy$Resp[toy$Treat == 0]
stopifnot(identical(toy$Ind[toy$Treat == 1], toy$Ind[toy$Treat == 0]))
tt <- t.test(treated, untreated, paired = TRUE)
paired <- list(toy = list(
  t = unname(tt$statistic),
  df = unname(tt$parameter),
  p_value = tt$p.value,
  estimate = unname(tt$estimate),
  conf_int = vec(tt$conf.int)
))

# ------------------------------------------------- likelihood ratio test ----
lrt_case <- function(d, null, alt) {
  tryCatch({
    res <- capture({
      m0 <- lme4::lmer(as.formula(null), data = d, REML = FALSE)
      m1 <- lme4::lmer(as.formula(alt), data = d, REML = FALSE)
      anova(m0, m1, refit = FALSE)
    })
    a <- res$value
    list(null = null, alt = alt,
         chisq = a[2, "Chisq"], df = a[2, "Df"], p_value = a[2, "Pr(>Chisq)"],
         loglik_null = a[1, "logLik"], loglik_alt = a[2, "logLik"],
         warnings = I(res$notes))
  }, error = function(e) list(null = null, alt = alt, error = conditionMessage(e)))
}
lrt <- list(
  toy = lrt_case(data_sets$toy, "Resp ~ 1 + (1|Ind)", "Resp ~ Treat + (1|Ind)"),
  sleepstudy = lrt_case(data_sets$sleepstudy, "Reaction ~ 1 + (1|Subject)",
                        "Reaction ~ Days + (1|Subject)")
)

# --------------------------------------------------------------- write ----
result <- list(
  meta = list(
    R = R.version.string,
    lme4 = as.character(packageVersion("lme4")),
    nlme = as.character(packageVersion("nlme")),
    lmerTest = as.character(packageVersion("lmerTest")),
    jsonlite = as.character(packageVersion("jsonlite")),
    Matrix = as.character(packageVersion("Matrix")),
    generated_by = "tests/reference/make_reference.R",
    timing_refits = N_TIMING
  ),
  cases = out_cases,
  paired_t_test = paired,
  lrt = lrt
)
jsonlite::write_json(result, out_file, auto_unbox = TRUE, digits = NA, pretty = TRUE,
                     null = "null", na = "null")
cat(sprintf("wrote %s\n", out_file))
