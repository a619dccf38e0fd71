package suite

import (
	"fmt"
	"image/color"
	"math"
	"path/filepath"
	"sort"
	"strings"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/vg"
)

var (
	plainColor = color.RGBA{R: 0x55, G: 0x55, B: 0x55, A: 0xff}
	accelColor = color.RGBA{R: 0xd6, G: 0x27, B: 0x28, A: 0xff}
)

// WriteCharts writes the PNG charts into dir: the latency distribution of
// every ping-pong case (epoll-pingpong, sockperf), plain vs accelerated, and the iperf3 throughput by
// write size of each topology. It returns the files written.
func (r *Report) WriteCharts(dir string) ([]string, error) {
	var files []string
	for _, c := range r.Cases {
		if (c.Workload != "sockperf" && c.Workload != "epoll-pingpong") || c.Error != "" || len(c.PlainPercentiles) == 0 {
			continue
		}
		name := filepath.Join(dir, "latency-"+fileName(c.Name)+".png")
		if err := latencyChart(c, name); err != nil {
			return files, fmt.Errorf("chart %s: %w", name, err)
		}
		files = append(files, name)
	}
	for _, t := range r.Topologies {
		var streams []CaseResult
		for _, c := range r.Cases {
			if c.Topology == t.Name && c.Workload == "iperf3" && c.Error == "" {
				streams = append(streams, c)
			}
		}
		if len(streams) == 0 {
			continue
		}
		name := filepath.Join(dir, "throughput-"+t.Name+".png")
		if err := throughputChart(t.Name, streams, name); err != nil {
			return files, fmt.Errorf("chart %s: %w", name, err)
		}
		files = append(files, name)
	}
	return files, nil
}

// nines maps a percentile to the "number of nines" axis: 90 -> 1,
// 99 -> 2, 99.9 -> 3; the minimum (0) is 0.
func nines(p float64) float64 {
	if p >= 100 {
		return math.NaN()
	}
	return -math.Log10(1 - p/100)
}

// latencyChart plots the round-trip distribution of the median runs.
func latencyChart(c CaseResult, file string) error {
	p := plot.New()
	p.Title.Text = fmt.Sprintf("%s: round-trip time by percentile", c.Name)
	p.X.Label.Text = "percentile"
	p.Y.Label.Text = "round trip (us)"
	p.Y.Scale = plot.LogScale{}
	p.Y.Tick.Marker = plot.LogTicks{Prec: -1}
	var ticks []plot.Tick
	for _, t := range []struct {
		p     float64
		label string
	}{{0, "min"}, {50, "50"}, {90, "90"}, {99, "99"}, {99.9, "99.9"}, {99.99, "99.99"}, {99.999, "99.999"}} {
		ticks = append(ticks, plot.Tick{Value: nines(t.p), Label: t.label})
	}
	p.X.Tick.Marker = plot.ConstantTicks(ticks)
	p.Add(plotter.NewGrid())
	for _, s := range []struct {
		label string
		pcts  []Percentile
		col   color.Color
	}{{"plain", c.PlainPercentiles, plainColor}, {"accelerated", c.AccelPercentiles, accelColor}} {
		var xys plotter.XYs
		for _, pt := range s.pcts {
			if x := nines(pt.P); !math.IsNaN(x) && pt.Us > 0 {
				xys = append(xys, plotter.XY{X: x, Y: pt.Us})
			}
		}
		if len(xys) == 0 {
			continue
		}
		if err := addLine(p, s.label, xys, s.col); err != nil {
			return err
		}
	}
	placeLegend(p)
	return p.Save(8*vg.Inch, 5*vg.Inch, file)
}

// throughputChart plots iperf3 throughput by write size, plain vs
// accelerated.
func throughputChart(topo string, cases []CaseResult, file string) error {
	sort.Slice(cases, func(i, j int) bool { return cases[i].Size < cases[j].Size })
	p := plot.New()
	p.Title.Text = fmt.Sprintf("%s: iperf3 throughput by write size", topo)
	p.X.Label.Text = "write size"
	p.Y.Label.Text = "Gbit/s"
	p.Y.Min = 0
	var ticks []plot.Tick
	var plain, accel plotter.XYs
	for _, c := range cases {
		x := math.Log2(float64(c.Size))
		ticks = append(ticks, plot.Tick{Value: x, Label: sizeLabel(c.Size)})
		for _, m := range c.Metrics {
			if m.Metric == "throughput" {
				plain = append(plain, plotter.XY{X: x, Y: m.PlainMedian})
				accel = append(accel, plotter.XY{X: x, Y: m.AccelMedian})
			}
		}
	}
	p.X.Tick.Marker = plot.ConstantTicks(ticks)
	if len(ticks) > 0 {
		p.X.Min, p.X.Max = ticks[0].Value-0.5, ticks[len(ticks)-1].Value+0.5
	}
	p.Add(plotter.NewGrid())
	if err := addLine(p, "plain", plain, plainColor); err != nil {
		return err
	}
	if err := addLine(p, "accelerated", accel, accelColor); err != nil {
		return err
	}
	placeLegend(p)
	return p.Save(8*vg.Inch, 5*vg.Inch, file)
}

// addLine adds a line with points and its legend entry.
func addLine(p *plot.Plot, label string, xys plotter.XYs, col color.Color) error {
	l, pts, err := plotter.NewLinePoints(xys)
	if err != nil {
		return err
	}
	l.Color, pts.Color = col, col
	l.Width = vg.Points(2)
	if label == "plain" {
		l.Dashes = []vg.Length{vg.Points(6), vg.Points(3)}
	}
	p.Add(l, pts)
	p.Legend.Add(label, l, pts)
	return nil
}

// fileName turns a case name into a file name.
func fileName(s string) string {
	return strings.NewReplacer("/", "-", " ", "_").Replace(s)
}

// placeLegend puts the legend top left, below the title.
func placeLegend(p *plot.Plot) {
	p.Legend.Top = true
	p.Legend.Left = true
	p.Legend.XOffs = vg.Points(8)
	p.Legend.YOffs = -vg.Points(8)
}
