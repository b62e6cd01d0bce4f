// Command promcheck checks what the lakecache chart gives Prometheus, with Prometheus's and the
// Prometheus Operator's own code, for the chart's tests (e2e/tests/chart.rs). Nothing here is
// product code.
//
// The test cluster has no Prometheus Operator, so nothing there would refuse a ServiceMonitor
// with a misspelt field, and no Prometheus would load the alerting rules. promtool would check
// the rules, but building it means building every service discovery Prometheus has (minutes
// more on a small machine); the packages its `check rules` relies on, model/rulefmt and
// promql/parser, are a small part of that, so this calls them directly, the way promtool does,
// and decodes the Prometheus Operator's objects into that project's own Go types:
//
//	promcheck objects < manifests.yaml
//	    Reads YAML documents (`helm template` output) and checks each monitoring.coreos.com/v1
//	    object: turned into JSON as the API server gets it, then decoded strictly into the
//	    Prometheus Operator's types (an unknown or misspelt field, a duplicate key, or a value of
//	    the wrong type, such as a number where a string belongs, is an error, as it would be
//	    against the CRD's schema); a PrometheusRule's groups are then
//	    parsed and validated as a Prometheus rule file (names, durations, label and annotation
//	    templates, every expression by the PromQL parser). Prints a JSON array on stdout, one
//	    entry per such object: {"kind", "name", "rules", "metrics"}, where metrics are the
//	    metric names a PrometheusRule's expressions select. Errors go to stderr, naming the
//	    object, and the exit status is 1.
//	promcheck exprs < expressions.json
//	    Reads a JSON array of PromQL expressions and prints a JSON array with, for each,
//	    {"expr", "metrics"} or {"expr", "error"}; the exit status is 1 when any failed to parse.
//
// It is a module of its own so that Prometheus's dependencies are resolved apart from every
// other tool's.
package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"sort"

	monitoringv1 "github.com/prometheus-operator/prometheus-operator/pkg/apis/monitoring/v1"
	"github.com/prometheus/common/model"
	"github.com/prometheus/prometheus/model/labels"
	"github.com/prometheus/prometheus/model/rulefmt"
	"github.com/prometheus/prometheus/promql/parser"
	k8syaml "k8s.io/apimachinery/pkg/util/yaml"
	"sigs.k8s.io/yaml"
)

func usage() {
	fmt.Fprintln(os.Stderr, "usage: promcheck objects < manifests.yaml | promcheck exprs < expressions.json")
	os.Exit(2)
}

func main() {
	if len(os.Args) != 2 {
		usage()
	}
	p := parser.NewParser(parser.Options{})
	input, err := io.ReadAll(os.Stdin)
	if err != nil {
		fmt.Fprintln(os.Stderr, "reading stdin:", err)
		os.Exit(1)
	}
	switch os.Args[1] {
	case "objects":
		os.Exit(objects(p, input))
	case "exprs":
		os.Exit(exprs(p, input))
	default:
		usage()
	}
}

// metricNames returns the metric names that expr's vector selectors name, sorted, without
// duplicates.
func metricNames(expr parser.Expr) []string {
	seen := map[string]bool{}
	parser.Inspect(expr, func(node parser.Node, _ []parser.Node) error {
		vs, ok := node.(*parser.VectorSelector)
		if !ok {
			return nil
		}
		if vs.Name != "" {
			seen[vs.Name] = true
		}
		for _, m := range vs.LabelMatchers {
			if m.Name == labels.MetricName && m.Type == labels.MatchEqual {
				seen[m.Value] = true
			}
		}
		return nil
	})
	return sorted(seen)
}

func sorted(set map[string]bool) []string {
	out := make([]string, 0, len(set))
	for n := range set {
		out = append(out, n)
	}
	sort.Strings(out)
	return out
}

type object struct {
	Kind    string   `json:"kind"`
	Name    string   `json:"name"`
	Rules   int      `json:"rules"`
	Metrics []string `json:"metrics"`
}

type header struct {
	APIVersion string `json:"apiVersion"`
	Kind       string `json:"kind"`
	Metadata   struct {
		Name string `json:"name"`
	} `json:"metadata"`
}

func objects(p parser.Parser, input []byte) int {
	reader := k8syaml.NewYAMLReader(bufio.NewReader(bytes.NewReader(input)))
	var out []object
	failed := false
	fail := func(what string, err error) {
		failed = true
		fmt.Fprintf(os.Stderr, "%s: %v\n", what, err)
	}
	// Bounded by the input: each Read consumes one document.
	for {
		doc, err := reader.Read()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			fail("reading the manifests", err)
			break
		}
		var h header
		if err := yaml.Unmarshal(doc, &h); err != nil {
			fail("a document", err)
			continue
		}
		if h.APIVersion != "monitoring.coreos.com/v1" {
			continue
		}
		what := h.Kind + " " + h.Metadata.Name
		o := object{Kind: h.Kind, Name: h.Metadata.Name, Metrics: []string{}}
		switch h.Kind {
		case "ServiceMonitor":
			var v monitoringv1.ServiceMonitor
			if err := decodeStrict(doc, &v); err != nil {
				fail(what, err)
				continue
			}
		case "PodMonitor":
			var v monitoringv1.PodMonitor
			if err := decodeStrict(doc, &v); err != nil {
				fail(what, err)
				continue
			}
		case "PrometheusRule":
			var v monitoringv1.PrometheusRule
			if err := decodeStrict(doc, &v); err != nil {
				fail(what, err)
				continue
			}
			n, metrics, errs := checkRules(p, v.Spec)
			for _, e := range errs {
				fail(what, e)
			}
			o.Rules, o.Metrics = n, metrics
		default:
			fail(what, fmt.Errorf("kind %s is not checked here", h.Kind))
			continue
		}
		out = append(out, o)
	}
	if failed {
		return 1
	}
	if out == nil {
		out = []object{}
	}
	text, _ := json.Marshal(out)
	fmt.Println(string(text))
	return 0
}

// decodeStrict decodes a YAML document into v the way the API server reads it: YAML to JSON
// without looking at v's types (sigs.k8s.io/yaml's Unmarshal would turn a number into the string
// a field wants, which the CRD's schema refuses), then JSON into v, refusing unknown fields.
func decodeStrict(doc []byte, v any) error {
	j, err := yaml.YAMLToJSONStrict(doc)
	if err != nil {
		return err
	}
	dec := json.NewDecoder(bytes.NewReader(j))
	dec.DisallowUnknownFields()
	return dec.Decode(v)
}

// checkRules validates a PrometheusRule's groups as Prometheus validates a rule file, and
// returns the number of rules and the metric names their expressions select.
func checkRules(p parser.Parser, spec monitoringv1.PrometheusRuleSpec) (int, []string, []error) {
	file, err := yaml.Marshal(spec)
	if err != nil {
		return 0, nil, []error{err}
	}
	logger := slog.New(slog.NewTextHandler(os.Stderr, nil))
	groups, errs := rulefmt.Parse(file, false, model.UTF8Validation, p, logger)
	if len(errs) > 0 {
		return 0, nil, errs
	}
	n := 0
	seen := map[string]bool{}
	for _, g := range groups.Groups {
		for _, r := range g.Rules {
			n++
			expr, err := p.ParseExpr(r.Expr)
			if err != nil {
				// rulefmt parsed it already; a difference here is a bug of this tool.
				errs = append(errs, fmt.Errorf("group %q: %w", g.Name, err))
				continue
			}
			for _, m := range metricNames(expr) {
				seen[m] = true
			}
		}
	}
	return n, sorted(seen), errs
}

type result struct {
	Expr    string   `json:"expr"`
	Metrics []string `json:"metrics,omitempty"`
	Error   string   `json:"error,omitempty"`
}

func exprs(p parser.Parser, input []byte) int {
	var list []string
	if err := json.Unmarshal(input, &list); err != nil {
		fmt.Fprintln(os.Stderr, "stdin is not a JSON array of strings:", err)
		return 1
	}
	results := make([]result, 0, len(list))
	status := 0
	for _, e := range list {
		expr, err := p.ParseExpr(e)
		if err != nil {
			results = append(results, result{Expr: e, Error: err.Error()})
			status = 1
			continue
		}
		results = append(results, result{Expr: e, Metrics: metricNames(expr)})
	}
	text, _ := json.Marshal(results)
	fmt.Println(string(text))
	return status
}
