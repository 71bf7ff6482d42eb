// dockerfile-check runs BuildKit's own Dockerfile frontend in lint mode (the
// checks `docker build --check` runs) without a Docker engine, and makes sure
// the named build targets exist. Base images are not fetched: a stand-in image
// config is returned for every FROM, so the check works offline.
//
//	dockerfile-check -f docker/Dockerfile -target gateway -target session
//
// Exit status: 0 clean, 1 on any lint warning, parse error or missing target,
// 2 on bad usage.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"strings"

	"github.com/moby/buildkit/client/llb"
	"github.com/moby/buildkit/client/llb/sourceresolver"
	"github.com/moby/buildkit/frontend/dockerfile/dockerfile2llb"
	"github.com/moby/buildkit/frontend/dockerui"
	digest "github.com/opencontainers/go-digest"
	ocispecs "github.com/opencontainers/image-spec/specs-go/v1"
)

type targets []string

func (t *targets) String() string     { return strings.Join(*t, ",") }
func (t *targets) Set(v string) error { *t = append(*t, v); return nil }

// offlineImages answers every base image lookup with a minimal, non-scratch
// image for the requested platform, so linting never touches a registry. It
// refuses images without a tag (BuildKit passes them here as ":latest"): base
// images are pinned, and a misspelt stage name in COPY --from lands here too.
type offlineImages struct{}

func (offlineImages) ResolveImageConfig(_ context.Context, ref string, opt sourceresolver.Opt) (string, digest.Digest, []byte, error) {
	if strings.HasSuffix(ref, ":latest") {
		return "", "", nil, fmt.Errorf("image %q is not pinned to a tag (or is it a misspelt stage name?)", ref)
	}
	p := ocispecs.Platform{OS: "linux", Architecture: "amd64"}
	if opt.ImageOpt != nil && opt.ImageOpt.Platform != nil {
		p = *opt.ImageOpt.Platform
	}
	img := ocispecs.Image{
		Platform: p,
		Config: ocispecs.ImageConfig{
			Env: []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"},
		},
		RootFS: ocispecs.RootFS{Type: "layers", DiffIDs: []digest.Digest{digest.FromString(ref)}},
	}
	dt, err := json.Marshal(img)
	if err != nil {
		return "", "", nil, err
	}
	return ref, digest.FromBytes(dt), dt, nil
}

// lintTarget lints the stages reachable from target ("" means every stage) and
// prints what it finds; it reports whether the file is clean.
func lintTarget(ctx context.Context, path string, dt []byte, target string) (bool, error) {
	// The lint report needs a source definition to point its locations into.
	sourceMap := llb.NewSourceMap(nil, path, "Dockerfile", dt)
	sourceMap.Definition = &llb.Definition{}
	opt := dockerfile2llb.ConvertOpt{
		Config:         dockerui.Config{Target: target},
		SourceMap:      sourceMap,
		MetaResolver:   offlineImages{},
		TargetPlatform: &ocispecs.Platform{OS: "linux", Architecture: "amd64"},
	}
	res, err := dockerfile2llb.DockerfileLint(ctx, dt, opt)
	if err != nil {
		return false, err
	}
	clean := len(res.Warnings) == 0 && res.Error == nil
	if !clean {
		name := target
		if name == "" {
			name = "all stages"
		}
		fmt.Fprintf(os.Stderr, "%s (%s):\n", path, name)
		if err := res.PrintTo(os.Stderr, nil); err != nil {
			return false, err
		}
		res.PrintErrorTo(os.Stderr, nil)
	}
	return clean, nil
}

func run() (bool, error) {
	var path string
	var want targets
	flag.StringVar(&path, "f", "Dockerfile", "Dockerfile to check")
	flag.Var(&want, "target", "build target (stage name) that must exist (repeatable)")
	flag.Parse()
	if flag.NArg() != 0 {
		return false, fmt.Errorf("unexpected arguments: %v", flag.Args())
	}
	dt, err := os.ReadFile(path)
	if err != nil {
		return false, err
	}
	ctx := context.Background()

	list, err := dockerfile2llb.ListTargets(ctx, dt)
	if err != nil {
		fmt.Fprintf(os.Stderr, "%s: %v\n", path, err)
		return false, nil
	}
	have := map[string]bool{}
	for _, t := range list.Targets {
		have[t.Name] = true
	}
	ok := true
	for _, t := range want {
		if !have[t] {
			fmt.Fprintf(os.Stderr, "%s: no stage named %q\n", path, t)
			ok = false
		}
	}
	for _, t := range append([]string{""}, want...) {
		if !have[t] && t != "" {
			continue
		}
		clean, err := lintTarget(ctx, path, dt, t)
		if err != nil {
			return false, err
		}
		ok = ok && clean
	}
	return ok, nil
}

func main() {
	ok, err := run()
	if err != nil {
		fmt.Fprintf(os.Stderr, "dockerfile-check: %v\n", err)
		os.Exit(2)
	}
	if !ok {
		os.Exit(1)
	}
}
