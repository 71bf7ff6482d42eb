// Prints ring-lookup vectors from go-zero's consistent hash, the ring
// teamgram's gateway and sessions use to shard by perm_auth_key_id.
package main

import (
	"encoding/json"
	"fmt"
	"os"
	"strconv"

	"github.com/spaolacci/murmur3"
	"github.com/zeromicro/go-zero/core/hash"
)

type lookup struct {
	Key   string `json:"key"`
	Owner string `json:"owner"`
}

type vectors struct {
	Murmur3 map[string]uint64 `json:"murmur3_sum64"`
	Members []string          `json:"members"`
	Lookups []lookup          `json:"lookups"`
	// After removing the second member.
	LookupsAfterRemove []lookup `json:"lookups_after_remove"`
}

func main() {
	v := vectors{Murmur3: map[string]uint64{}}
	for _, s := range []string{"", "hello", "10.1.2.3:20120", "10.1.2.3:201200", "-9223372036854775808", "16777619:42"} {
		v.Murmur3[s] = murmur3.Sum64([]byte(s))
	}
	v.Members = []string{"10.0.0.11:20120", "10.0.0.12:20120", "10.0.0.13:20120"}
	ring := hash.NewConsistentHash()
	for _, m := range v.Members {
		ring.Add(m)
	}
	keys := []int64{0, 1, -1, 42, 7310411113393461234, -5812712342304231222, 9223372036854775807, -9223372036854775808}
	for i := int64(0); i < 40; i++ {
		keys = append(keys, i*2654435761*1000003-i*i*97)
	}
	for _, k := range keys {
		s := strconv.FormatInt(k, 10)
		owner, _ := ring.Get(s)
		v.Lookups = append(v.Lookups, lookup{s, owner.(string)})
	}
	ring.Remove(v.Members[1])
	for _, k := range keys {
		s := strconv.FormatInt(k, 10)
		owner, _ := ring.Get(s)
		v.LookupsAfterRemove = append(v.LookupsAfterRemove, lookup{s, owner.(string)})
	}
	enc := json.NewEncoder(os.Stdout)
	enc.SetIndent("", " ")
	if err := enc.Encode(v); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}
